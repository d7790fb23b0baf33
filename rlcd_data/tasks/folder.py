"""Reading a task folder: task.yaml and its templates, checked before anything is rendered.

Every check names the file (and line, for syntax errors): a missing template, a template using a
variable its task does not provide (all misspelt names at once), p+ and p- that see different inputs,
labeller and rater templates that do not end where the label or the score comes next.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import jinja2.meta

from ..errors import RlcdError
from ..yaml_file import read_mapping
from .task import (
    ANSWER_START,
    COMPARE_FILE,
    COMPARE_VARIABLES,
    DESCRIPTOR_VARIABLES,
    INPUT_VARIABLES,
    JINJA,
    RATE_FILE,
    RATE_VARIABLES,
    RATING_START,
    SYSTEM_FILE,
    SYSTEM_VARIABLES,
    TEMPLATE_FILES,
    DescriptorPair,
    Task,
)


def load_task_folder(folder: Path) -> Task:
    meta = _read_task_yaml(folder / "task.yaml")
    allowed = INPUT_VARIABLES[meta["input"]] | DESCRIPTOR_VARIABLES
    templates, used = {}, {}
    for key, filename in TEMPLATE_FILES.items():
        path = folder / filename
        if not path.is_file():
            raise RlcdError(f"{path}: missing template (a task needs {', '.join(TEMPLATE_FILES.values())})")
        templates[key], names = _parse(path)
        unknown = sorted(names - allowed)
        if unknown:
            raise RlcdError(
                f"{path}: undefined template variable(s) {', '.join(unknown)} "
                f"(a {meta['input']} task provides: {', '.join(sorted(allowed))})"
            )
        used[key] = names
    # p+ and p- must see the same input; each must ask for its own side.
    if used["p_plus"] - DESCRIPTOR_VARIABLES != used["p_minus"] - DESCRIPTOR_VARIABLES:
        raise RlcdError(
            f"{folder}: p_plus.jinja and p_minus.jinja must use the same input variables "
            f"({', '.join(sorted(used['p_plus'] - DESCRIPTOR_VARIABLES))} vs "
            f"{', '.join(sorted(used['p_minus'] - DESCRIPTOR_VARIABLES))})"
        )
    for key, side in (("p_plus", "positive"), ("p_minus", "negative")):
        if side not in used[key]:
            raise RlcdError(f"{folder / TEMPLATE_FILES[key]}: never uses {{{{ {side} }}}}")
    if used["prompt"] & DESCRIPTOR_VARIABLES:
        raise RlcdError(f"{folder / 'prompt.jinja'}: the unmodified prompt must not use descriptors")
    instructions, scorer_version = _load_compare(folder, meta, templates)
    rating_instruction, rater_version = _load_rate(folder, meta, templates)
    _load_system(folder, meta, templates)
    return Task(
        name=folder.name,
        description=meta["description"],
        version=meta["version"],
        input=meta["input"],
        prompt_source=meta.get("prompt_source", ""),
        descriptors=meta["descriptors"],
        folder=folder,
        templates=templates,
        instructions=instructions,
        scorer_version=scorer_version,
        rating_instruction=rating_instruction,
        rater_version=rater_version,
    )


def _parse(path: Path) -> tuple[jinja2.Template, set[str]]:
    """A template and the variables it uses.

    Raises:
        RlcdError: a syntax error, with its file and line.
    """
    source = path.read_text()
    try:
        return JINJA.from_string(source), jinja2.meta.find_undeclared_variables(JINJA.parse(source))
    except jinja2.TemplateSyntaxError as e:
        raise RlcdError(f"{path}:{e.lineno}: template syntax error: {e.message}") from None


def _load_system(folder: Path, meta: dict, templates: dict) -> None:
    """Read the optional chat-format system message template (it must use ``descriptor``)."""
    path = folder / SYSTEM_FILE
    if not path.is_file():
        return
    templates["system"], names = _parse(path)
    allowed = INPUT_VARIABLES[meta["input"]] | SYSTEM_VARIABLES
    unknown = sorted(names - allowed)
    if unknown:
        raise RlcdError(
            f"{path}: undefined template variable(s) {', '.join(unknown)} (it is given: {', '.join(sorted(allowed))})"
        )
    if "descriptor" not in names:
        raise RlcdError(f"{path}: never uses {{{{ descriptor }}}} (p+ and p- differ in it alone)")


def _load_compare(folder: Path, meta: dict, templates: dict) -> tuple[tuple[str, ...], int | None]:
    """Read the optional comparison template and its instructions (``scorer:`` in task.yaml)."""
    path = folder / COMPARE_FILE
    scorer = meta.get("scorer")
    if not path.is_file():
        if scorer is not None:
            raise RlcdError(f"{folder / 'task.yaml'}: has a scorer section but {path.name} is missing")
        return (), None
    where = folder / "task.yaml"
    if not isinstance(scorer, dict) or "instructions" not in scorer or "version" not in scorer:
        raise RlcdError(f"{where}: {COMPARE_FILE} needs a `scorer:` section with `version` and `instructions`")
    instructions = scorer["instructions"]
    n = len(meta["descriptors"])
    if not isinstance(instructions, list) or len(instructions) not in {1, n} or not all(
        isinstance(i, str) and i.strip() for i in instructions
    ):
        raise RlcdError(f"{where}: scorer.instructions must list 1 or {n} (one per descriptor pair) non-empty texts")
    templates["compare"], names = _parse(path)
    source = path.read_text()
    _check_variables(path, names, INPUT_VARIABLES[meta["input"]] | COMPARE_VARIABLES, COMPARE_VARIABLES)
    if not source.rstrip("\n").endswith(ANSWER_START):
        raise RlcdError(f"{path}: must end with '{ANSWER_START}' (the label is the next token, A or B)")
    return tuple(i.strip() for i in instructions), int(scorer["version"])


def _load_rate(folder: Path, meta: dict, templates: dict) -> tuple[str | None, int | None]:
    """Read the optional rating template and its instruction (``rater:`` in task.yaml)."""
    path, where = folder / RATE_FILE, folder / "task.yaml"
    rater = meta.get("rater")
    if not path.is_file():
        if rater is not None:
            raise RlcdError(f"{where}: has a rater section but {path.name} is missing")
        return None, None
    if not isinstance(rater, dict) or "version" not in rater or not str(rater.get("instruction") or "").strip():
        raise RlcdError(f"{where}: {RATE_FILE} needs a `rater:` section with `version` and a non-empty `instruction`")
    templates["rate"], names = _parse(path)
    _check_variables(path, names, INPUT_VARIABLES[meta["input"]] | RATE_VARIABLES, RATE_VARIABLES)
    if not path.read_text().rstrip("\n").endswith(RATING_START):
        raise RlcdError(f"{path}: must end with '{RATING_START}' (the score, 1 to 10, comes next)")
    return str(rater["instruction"]).strip(), int(rater["version"])


def _check_variables(path: Path, names: set[str], allowed: set[str], required: set[str]) -> None:
    """Raises RlcdError: the template uses a variable it is not given, or never uses a required one."""
    unknown = sorted(names - allowed)
    if unknown:
        raise RlcdError(
            f"{path}: undefined template variable(s) {', '.join(unknown)} (it is given: {', '.join(sorted(allowed))})"
        )
    missing = sorted(required - names)
    if missing:
        raise RlcdError(f"{path}: never uses {', '.join(missing)}")


def _read_task_yaml(path: Path) -> dict:
    meta = read_mapping(path, "task file")
    missing = [k for k in ("description", "version", "input", "descriptors") if k not in meta]
    if missing:
        raise RlcdError(f"{path}: missing key(s): {', '.join(missing)}")
    if meta["input"] not in INPUT_VARIABLES:
        raise RlcdError(f"{path}: input must be one of {', '.join(INPUT_VARIABLES)}, got {meta['input']!r}")
    pairs = meta["descriptors"]
    if not isinstance(pairs, list) or not pairs:
        raise RlcdError(f"{path}: descriptors must be a non-empty list of {{positive, negative}} pairs")
    parsed = []
    for i, pair in enumerate(pairs, 1):
        if not (isinstance(pair, dict) and set(pair) == {"positive", "negative"}):
            raise RlcdError(f"{path}: descriptor pair {i} must have exactly the keys positive and negative")
        parsed.append(DescriptorPair(str(pair["positive"]), str(pair["negative"])))
    meta["descriptors"] = tuple(parsed)
    return meta

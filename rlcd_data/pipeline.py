"""`rlcd-data build`: prompts -> contrast pairs -> generations -> a Hub-ready dataset folder."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .chat import ChatRenderer, resolve_format
from .config import BuildConfig
from .conversation import extract_response
from .errors import RlcdError
from .generate import Generator, request_seed
from .methods import METHODS, Method, base_row, label_rows, supported
from .prompts import PromptSet, load_prompts
from .labeller import Labeller
from .models import load_tokenizer
from .tasks import COMPARE_FILE, ContrastPair, Task, load_task

STAGING = ".rlcd-build"  # completed pairs land here as the build goes
# Sampling seeds name p+ and p- as the chosen and rejected sides (as since the first release).
SEED_SIDE = {"p_plus": "chosen", "p_minus": "rejected"}
STATE_FILE = "state.json"  # what an interrupted build was building, checked on --resume
ELAPSED_FILE = "elapsed.json"  # seconds the build has run, as of its last completed part
DONE_FILE = "done.json"  # a finished shard: its configuration and counts, read by `merge`


@dataclass
class BuildStats:
    prompts_read: int = 0
    prompts_dropped_empty: int = 0
    prompts_dropped_duplicate: int = 0
    prompts_used: int = 0
    pairs: int = 0
    examples_dropped: int = 0  # an output still failed after max_retries re-generations
    outputs_retried: int = 0  # re-generations of failed outputs
    generated_tokens: int = 0
    seconds: float = 0.0
    dropped_source_indices: list[int] = field(default_factory=list)


@dataclass
class BuildResult:
    output: Path
    config: BuildConfig
    stats: BuildStats
    splits: dict[str, int]
    model: str
    shard: tuple[int, int] | None = None  # a shard's result: its rows wait in OUTPUT/.rlcd-build for `merge`
    complete_before: bool = False  # --resume found the dataset already finished: nothing was generated

    def load_line(self) -> str:
        return f'datasets.load_dataset("{self.output}")'


def shard_dir(out: Path, shard: tuple[int, int] | None) -> Path:
    """Where a build (or one shard of it) keeps its completed parts."""
    if shard is None:
        return out / STAGING
    return out / STAGING / f"shard-{shard[0]:05d}-of-{shard[1]:05d}"


def check_output(out: Path, overwrite: bool, resume: bool = False, shard: tuple[int, int] | None = None) -> None:
    if out.exists() and not out.is_dir():
        raise RlcdError(f"{out}: output exists and is not a folder")
    staging = shard_dir(out, shard)
    if resume:
        if not (staging / STATE_FILE).is_file():
            what = f"shard {shard[0]} of {shard[1]}" if shard else "build"
            raise RlcdError(f"{out}: nothing to resume (no interrupted {what} in this folder)")
        return
    if shard is not None:
        # Shards share the folder: only this shard's own staging folder must be new.
        others = [p.name for p in out.iterdir() if p.name != STAGING] if out.is_dir() else []
        if (others or (staging.is_dir() and any(staging.iterdir()))) and not overwrite:
            hint = " or --resume to continue it" if (staging / STATE_FILE).is_file() else ""
            raise RlcdError(f"{out}: output folder or this shard's files exist (pass --overwrite to replace them{hint})")
        return
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        hint = " or --resume to continue it" if (out / STAGING / STATE_FILE).is_file() else ""
        raise RlcdError(f"{out}: output folder exists and is not empty (pass --overwrite to replace it{hint})")


@dataclass
class Plan:
    """A build's inputs, checked and rendered: everything that can fail on bad input."""

    config: BuildConfig  # its prompt format (and so the default temperature) resolved
    task: Task
    prompt_set: PromptSet
    pairs: list[ContrastPair]
    chat: ChatRenderer | None  # the simulator's chat template, in the chat format


def prepare(config: BuildConfig, tokenizer: Callable[[], object] | None = None) -> Plan:
    """Check the task and prompts and render every contrast pair, before any model is loaded.

    Args:
        tokenizer: returns the simulator's tokenizer (or None), asked only when the chat format
            may apply; default: load the tokenizer of ``config.model``.

    Raises:
        RlcdError: unknown task, bad templates, bad prompt source, a chat format that cannot apply.
    """
    task = load_task(config.task, config.templates)
    if config.method not in supported(task):
        raise RlcdError(
            f"task {task.name!r} does not support --method {config.method} (it has no compare.jinja for the "
            f"A/B labeller; supported: {', '.join(supported(task))})"
        )
    source = config.prompts or task.bundled_prompts
    if source is None:
        raise RlcdError(f"task {task.name!r} has no bundled prompts; pass --prompts")
    prompt_set = load_prompts(
        source, task_input=task.input, column=config.prompt_column, split=config.split, limit=config.limit
    )
    loaded = None
    if config.prompt_format != "text" and task.has_chat:
        loaded = tokenizer() if tokenizer is not None else load_tokenizer(config.model)
    resolved = resolve_format(config.prompt_format, task.has_chat, loaded, task.name, config.model)
    config = config.with_prompt_format(resolved)
    chat = ChatRenderer(loaded, config.model) if resolved == "chat" else None
    pairs = [task.render_pair(p.text, p.source_index, config.seed, chat) for p in prompt_set.prompts]
    return Plan(config, task, prompt_set, pairs, chat)


def build(
    config: BuildConfig, generator: Generator | None = None, progress: bool = True, labeller: Labeller | None = None
) -> BuildResult:
    """Build a preference dataset (RLCD or a baseline, see `rlcd_data.methods`) into ``config.output``.

    Args:
        config: what to build.
        generator: the model to sample from; default: load ``config.model``.
        progress: show a progress bar on stderr.
        labeller: the A/B labeller of scored methods; default: the generator's
            own model (no second copy).

    Returns:
        BuildResult with the output folder, counts and split sizes.

    Raises:
        RlcdError: bad input (before any model is loaded) or an unavailable model.
        KeyboardInterrupt: pairs completed so far stay in ``OUTPUT/.rlcd-build/``.
    """
    from . import output

    started = time.monotonic()
    if generator is None:  # the model is loaded here: record the dtype `auto` stands for on this machine
        from .models import resolve_dtype

        config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, config.quantization))
    out = Path(config.output)
    shard = config.shard()
    plan = prepare(config, None if generator is None else lambda: getattr(generator, "tokenizer", None))
    config, task, prompt_set, all_pairs = plan.config, plan.task, plan.prompt_set, plan.pairs
    if config.resume and shard is None and (finished := _finished_build(out, config)) is not None:
        return finished  # a requeued job running the same command again converges on the same dataset
    check_output(out, config.overwrite, config.resume, shard)
    if generator is None:  # which engine runs is part of the record too (resume refuses another)
        from .generate.backends import choose_backend

        backend, why = choose_backend(config.backend, config.quantization)
        config = dataclasses.replace(config, backend=backend)
    # Shard k of n takes examples k, k + n, k + 2n, ...: every shard gets short and long prompts alike.
    pairs = all_pairs if shard is None else all_pairs[shard[0] :: shard[1]]
    staging = shard_dir(out, shard)
    state = _build_state(config, task, all_pairs)
    previous_rows: list[dict] = []
    previous_dropped: list[int] = []
    next_part = 0
    if config.resume:
        _check_state(staging / STATE_FILE, state)
        previous_rows, previous_dropped, next_part = _read_parts(staging)
        started -= _elapsed_before(staging)  # the card's build time covers every run of the build
    done = {r["source_index"] for r in previous_rows} | set(previous_dropped)
    todo = [p for p in pairs if p.source_index not in done]
    method = METHODS[config.method]
    opened = generator is None
    if generator is None:
        from .generate.backends import open_generator

        generator, make_labeller = open_generator(config)
        if progress:
            print(f"rlcd-data: generating with {config.backend} ({why})", file=sys.stderr)
        if method.scored and labeller is None:
            labeller = make_labeller()
    elif method.scored and labeller is None:  # a generator given by the caller: label with its model
        from .labeller import TransformersLabeller

        if not hasattr(generator, "model"):
            raise RlcdError(f"--method {method.name} needs a labeller for this generator")
        labeller = TransformersLabeller(generator.model, generator.tokenizer, config.batch_size)

    stats = BuildStats(
        prompts_read=prompt_set.read,
        prompts_dropped_empty=prompt_set.dropped_empty,
        prompts_dropped_duplicate=prompt_set.dropped_duplicate,
        prompts_used=len(pairs),
        pairs=len(previous_rows),
        examples_dropped=len(previous_dropped),
        dropped_source_indices=list(previous_dropped),
    )
    if not config.resume:
        if staging.exists():
            shutil.rmtree(staging)  # parts of an earlier, different build
        try:
            staging.mkdir(parents=True)
            _write_atomic(staging / STATE_FILE, json.dumps(state, indent=2))
        except OSError as e:
            raise RlcdError(f"{staging}: cannot write ({e.strerror})") from None
    try:
        rows = previous_rows + _generate_rows(
            todo, generator, config, stats, staging, progress, next_part, len(pairs), method=method, task=task,
            labeller=labeller, chat=plan.chat, started=started,
        )
    finally:
        if opened and hasattr(generator, "close"):
            generator.close()  # a vLLM engine's processes and memory, now rather than at exit
    rows.sort(key=lambda r: r["source_index"])
    stats.dropped_source_indices.sort()
    stats.seconds = time.monotonic() - started
    if shard is not None:
        record = {"config": config.to_dict(), "stats": dataclasses.asdict(stats), "model": generator.description}
        _write_atomic(staging / DONE_FILE, json.dumps(record, indent=2))
        result = BuildResult(out, config, stats, {}, generator.description, shard=shard)
        if config.num_shards is None:  # started by a launcher (RANK / WORLD_SIZE): rank 0 merges
            return _merge_when_all_done(out, result)
        return result
    if not rows:
        raise RlcdError(
            f"no pairs: all {len(pairs)} examples failed after {config.max_retries} retries "
            f"(every output was empty or cut off at --max-new-tokens {config.max_new_tokens}; try a larger limit)"
        )
    splits = output.write_dataset_folder(out, rows, config=config, task=task, stats=stats, model=generator.description)
    return BuildResult(out, config, stats, splits, generator.description)


def _finished_build(out: Path, config: BuildConfig) -> BuildResult | None:
    """The build already finished in ``out``, if it has one and no interrupted one.

    Raises:
        RlcdError: the finished build's configuration differs from ``config``.
    """
    import pyarrow.parquet as pq

    from .config import CONFIG_FILENAME, read_config_file

    if (out / STAGING / STATE_FILE).is_file() or not (out / CONFIG_FILENAME).is_file() or not (out / "data").is_dir():
        return None
    saved = read_config_file(out / CONFIG_FILENAME)
    differ = [
        f"{k}: {saved[k]!r} -> {v!r}" for k, v in config.output_fields().items()
        if k in saved and saved[k] != v and not (k == "backend" and v == "auto")  # auto: whichever ran
    ]
    if differ:
        raise RlcdError(f"{out}: holds a finished build with another configuration ({', '.join(differ)}); "
                        "pass --overwrite to replace it")
    splits = {p.name.split("-")[0]: pq.ParquetFile(p).metadata.num_rows for p in sorted((out / "data").glob("*.parquet"))}
    stats = BuildStats(pairs=sum(splits.values()))
    return BuildResult(out, config, stats, splits, model=str(saved.get("model")), complete_before=True)


def _generate_rows(
    pairs: list[ContrastPair],
    generator: Generator,
    config: BuildConfig,
    stats: BuildStats,
    staging: Path,
    progress: bool,
    first_part: int = 0,
    total: int | None = None,
    *,
    method: Method = METHODS["rlcd"],
    task: Task | None = None,
    labeller: Labeller | None = None,
    chat: ChatRenderer | None = None,
    started: float | None = None,
) -> list[dict]:
    """Generate every output of every example (both sides of a pair for RLCD), label scored
    methods, and write completed rows to ``staging`` as they finish.

    Each output may take up to ``1 + max_retries`` attempts; attempt ``a`` of
    an output samples with its own seed, and the output is the first attempt
    (lowest ``a``) that passes post-processing, exactly as a sequential retry
    loop would give. Completed pairs are written as soon as half a batch of
    them is known complete. Pairs are fed in large chunks (a generate() call's batch only
    drains at its end); a failed output's next attempt joins the call under way (or, with a
    generator that cannot take requests during a call, the next call). When fewer requests
    than a batch are left (the tail of a call), later attempts of pending outputs fill the
    free slots instead of waiting for the earlier ones to fail.
    """
    from tqdm.auto import tqdm

    sides = method.sides
    settings = config.sampling()
    chunk = 64 * config.batch_size  # pairs per generate() call
    responses: dict[tuple[int, str], str] = {}
    next_attempt: dict[tuple[int, str], int] = {}  # outputs still pending -> first attempt not yet tried
    dropped: set[int] = set()
    rows: list[dict] = []
    total = len(pairs) if total is None else total
    bar = tqdm(
        total=total, initial=total - len(pairs), unit="pair", disable=not progress, dynamic_ncols=True,
        desc=f"{method.name} {config.task}",
    )
    clock = time.monotonic()
    call: dict = {"requests": [], "outcomes": {}, "pending": {}, "retried": 0}  # the generate() call under way
    counted: set[int] = set()  # pairs already shown as done on the progress bar
    shown = {"pairs": -1, "at": clock}  # the bar's last redraw
    ready: list[int] = []  # pairs known complete during a call, not yet written
    written: set[int] = set()
    part = {"number": first_part}
    # Completed pairs are written as soon as this many are ready, not at the end of the call:
    # a kill loses about one batch of work.
    flush_at = max(1, config.batch_size // 2)

    def winning(key: tuple[int, str]) -> str | None:
        """The output's response once known: the first attempt that passed, every earlier one having failed."""
        if key in responses:
            return responses[key]
        by_attempt, attempt = call["outcomes"].get(key, {}), next_attempt.get(key, 0)
        while attempt in by_attempt and by_attempt[attempt] is None:
            attempt += 1
        return by_attempt.get(attempt)

    def write(indices: list[int], lost: list[int]) -> None:
        new_rows = [
            base_row(pairs[i], method, {side: winning((i, side)) for side in sides}, generator.count_tokens)
            for i in indices
        ]
        new_rows = label_rows(
            new_rows, method=method, task=task, labeller=labeller, seed=config.seed, both_orders=config.label_both_orders,
            chat=chat,
        )
        records = new_rows + [{"dropped_source_index": k} for k in lost]  # dropped: a resume skips them too
        if not records:
            return
        try:
            _write_part(staging / f"part-{part['number']:06d}.jsonl", records)
        except OSError as e:
            raise RlcdError(
                f"{staging}: cannot write part {part['number']} ({e.strerror or e}); the parts written before it "
                "are intact: make room and re-run with --resume"
            ) from None
        part["number"] += 1
        if started is not None:  # the time so far, for the build time of a resumed build (best effort)
            with contextlib.suppress(OSError):
                _write_atomic(staging / ELAPSED_FILE, json.dumps({"seconds": time.monotonic() - started}))
        rows.extend(new_rows)
        written.update(indices)
        stats.pairs += len(new_rows)

    def request(key: tuple[int, str], attempt: int) -> tuple[str, int]:
        """The prompt and sampling seed of one attempt at one output."""
        i, side = key
        return (method.request_text(pairs[i], side),
                request_seed(config.seed, "sample", pairs[i].source_index, SEED_SIDE.get(side, side), attempt))

    def schedule(key: tuple[int, str]) -> list[tuple[str, int]]:
        """Add the output's next attempt to the call under way (none after its last)."""
        following = max(call["pending"][key] | call["outcomes"].get(key, {}).keys()) + 1
        if following > config.max_retries:
            return []
        call["pending"][key].add(following)
        call["requests"].append((key, following))
        return [request(key, following)]

    def on_progress(done: list, tokens: int) -> list[tuple[str, int]]:
        stats.generated_tokens += tokens
        retries = []
        for index, completion in done:
            key, attempt = call["requests"][index]
            outcome = extract_response(completion.text, completion.ended)
            call["outcomes"].setdefault(key, {})[attempt] = outcome
            pending = call["pending"][key]
            pending.discard(attempt)
            # A failed output whose attempts in this call have all failed: its next attempt joins this call.
            if outcome is None and not pending and all(o is None for o in call["outcomes"][key].values()):
                retries += schedule(key)
            if key[0] not in counted and all(winning((key[0], side)) is not None for side in sides):
                counted.add(key[0])
                ready.append(key[0])
                bar.update(1)
        # The tail of the call: fill the batch with later attempts of outputs still pending.
        unresolved = [k for k, p in call["pending"].items()
                      if p and all(o is None for o in call["outcomes"].get(k, {}).values())]
        while unresolved and sum(map(len, call["pending"].values())) < config.batch_size:
            more = [r for key in unresolved for r in schedule(key)]
            if not more:
                break
            retries += more
        if len(ready) >= flush_at:
            write(sorted(ready), [])
            ready.clear()
        elapsed = max(time.monotonic() - clock, 1e-9)
        call["retried"] += len(retries)
        retried = stats.outputs_retried + call["retried"]
        bar.set_postfix_str(f"{stats.generated_tokens / elapsed:.0f} tok/s, {retried} retried", refresh=False)
        # Redraw when a pair finished, else at most once a second: not once per decoding step (a log file
        # would get a line per step).
        now = time.monotonic()
        if bar.n != shown["pairs"] or now - shown["at"] >= 1.0:
            bar.refresh()
            shown.update(pairs=bar.n, at=now)
        return retries

    try:
        start = 0
        while start < len(pairs) or next_attempt:
            fresh = range(start, min(start + chunk, len(pairs)))
            start = fresh.stop
            next_attempt.update({(i, side): 0 for i in fresh for side in sides})
            requests = _schedule(next_attempt, config.batch_size, config.max_retries)
            texts, seeds = zip(*(request(key, a) for key, a in requests))
            pending: dict = {}
            for key, a in requests:
                pending.setdefault(key, set()).add(a)
            call.update(requests=requests, outcomes={}, pending=pending, retried=0)
            completions = generator.generate(list(texts), list(seeds), settings, on_progress)
            outcomes: dict[tuple[int, str], dict[int, str | None]] = call["outcomes"]
            # call["requests"] now also holds the retries added during the call (a generator that
            # does not run them returns fewer completions: they are scheduled again below).
            for (key, attempt), completion in zip(call["requests"], completions):
                if attempt not in outcomes.get(key, {}):  # a generator that reported no progress
                    outcomes.setdefault(key, {})[attempt] = extract_response(completion.text, completion.ended)
            for key, by_attempt in outcomes.items():
                winner = next((a for a in sorted(by_attempt) if by_attempt[a] is not None), None)
                if winner is not None:
                    responses[key] = by_attempt[winner]
                    stats.outputs_retried += winner - next_attempt.pop(key)
                    continue
                stats.outputs_retried += max(by_attempt) + 1 - next_attempt[key]
                next_attempt[key] = max(by_attempt) + 1
                if next_attempt[key] > config.max_retries:
                    stats.outputs_retried -= 1  # the last failure is not followed by a retry
                    dropped.add(key[0])
            for key in [k for k in next_attempt if k[0] in dropped]:
                del next_attempt[key]
            waiting = {i for i, _ in next_attempt}
            finished = sorted({i for i, _ in outcomes} - waiting)
            lost = [pairs[i].source_index for i in finished if i in dropped]
            stats.examples_dropped += len(lost)
            stats.dropped_source_indices += lost
            write([i for i in finished if i not in dropped and i not in written], lost)
            ready.clear()
            bar.update(len(set(finished) - counted))
            counted.update(finished)
    except KeyboardInterrupt:
        if ready:  # pairs completed in the interrupted call: keep them for --resume
            write(sorted(ready), [])
        raise
    finally:
        bar.close()
    return rows


def _schedule(next_attempt: dict, batch_size: int, max_retries: int) -> list[tuple[tuple[int, str], int]]:
    """One attempt per pending output; then, while the batch has free slots, later attempts round-robin."""
    requests = [(key, a) for key, a in next_attempt.items()]
    depth = 1
    while len(requests) < batch_size:
        extra = [(key, a + depth) for key, a in next_attempt.items() if a + depth <= max_retries]
        if not extra:
            break
        requests += extra[: batch_size - len(requests)]
        depth += 1
    return requests


def _write_part(path: Path, records: list[dict]) -> None:
    """Write completed records atomically: a killed process leaves either the whole file or none."""
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # never leave a half-written file behind
        raise


def _merge_when_all_done(out: Path, result: BuildResult) -> BuildResult:
    """Under accelerate launch / torchrun: wait for every rank, then rank 0 merges the shards."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    # Shards finish at different times; the rendezvous must outwait the slowest one.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=7))
    state.wait_for_everyone()
    if state.is_main_process:
        return merge(out)
    return result


def merge(out: str | Path) -> BuildResult:
    """Assemble the finished shards in ``out`` into the final dataset folder and card.

    Raises:
        RlcdError: no shards, a shard missing or unfinished, or shards built
            with different configurations, templates or prompts.
    """
    from . import output

    out = Path(out)
    dirs = sorted((out / STAGING).glob("shard-*-of-*"))
    if not dirs:
        raise RlcdError(f"{out}: no shards to merge (no {STAGING}/shard-* folders)")
    counts = {int(d.name.rsplit("-", 1)[1]) for d in dirs}
    if len(counts) > 1:
        raise RlcdError(f"{out}: shards of different --num-shards ({', '.join(map(str, sorted(counts)))}) in one folder")
    n = counts.pop()
    records, states = {}, set()
    for d in dirs:
        index = int(d.name.split("-")[1])
        if (d / DONE_FILE).is_file():
            records[index] = json.loads((d / DONE_FILE).read_text())
            states.add((d / STATE_FILE).read_text())
    missing = [i for i in range(n) if i not in records]
    if missing:
        raise RlcdError(
            f"{out}: shard(s) {', '.join(map(str, missing))} of {n} not finished; build them "
            f"(--num-shards {n} --shard-index I, with --resume if started) and merge again"
        )
    if len(states) > 1:
        raise RlcdError(f"{out}: the shards were built with different configurations, templates or prompts")
    rows, dropped = [], []
    for d in dirs:
        shard_rows, shard_dropped, _ = _read_parts(d)
        rows += shard_rows
        dropped += shard_dropped
    rows.sort(key=lambda r: r["source_index"])
    first = records[0]
    config = BuildConfig(
        **{**first["config"], "output": str(out), "num_shards": None, "shard_index": None, "resume": False,
           "overwrite": False}
    )
    shard_stats = [BuildStats(**r["stats"]) for r in records.values()]
    stats = BuildStats(
        prompts_read=shard_stats[0].prompts_read,
        prompts_dropped_empty=shard_stats[0].prompts_dropped_empty,
        prompts_dropped_duplicate=shard_stats[0].prompts_dropped_duplicate,
        prompts_used=sum(s.prompts_used for s in shard_stats),
        pairs=len(rows),
        examples_dropped=len(dropped),
        outputs_retried=sum(s.outputs_retried for s in shard_stats),
        generated_tokens=sum(s.generated_tokens for s in shard_stats),
        seconds=max(s.seconds for s in shard_stats),  # the shards ran side by side
        dropped_source_indices=sorted(dropped),
    )
    if not rows:
        raise RlcdError(f"{out}: no pairs in any shard")
    task = load_task(config.task, config.templates)
    splits = output.write_dataset_folder(out, rows, config=config, task=task, stats=stats, model=first["model"])
    return BuildResult(out, config, stats, splits, first["model"])


def _elapsed_before(staging: Path) -> float:
    """Seconds the interrupted runs of a build spent, up to their last completed part."""
    try:
        return float(json.loads((staging / ELAPSED_FILE).read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        return 0.0  # started before this was recorded


def _read_parts(staging: Path) -> tuple[list[dict], list[int], int]:
    """Rows and dropped source indices of the completed parts, and the next part number."""
    rows, dropped, parts = [], [], sorted(staging.glob("part-*.jsonl"))
    for part in parts:
        for line in part.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "dropped_source_index" in record:
                dropped.append(record["dropped_source_index"])
            else:
                rows.append(record)
    next_part = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
    return rows, dropped, next_part


def _build_state(config: BuildConfig, task: Task, pairs: list[ContrastPair]) -> dict:
    """What a build makes, for checking a resume: its output fields, every example's rendered prompts
    (which the prompt source, templates and descriptor pairs all go into), and for scored methods the
    labeller's template and instructions. Task files that do not change the output (the README, the
    comparison template of an unscored method) may be edited while a build is interrupted."""
    prompts = json.dumps([(p.source_index, p.prompt, p.p_plus, p.p_minus) for p in pairs])
    labeller = None
    if METHODS[config.method].scored:
        compare = (task.folder / COMPARE_FILE).read_text()
        labeller = json.dumps([compare, task.instructions, task.scorer_version])
    return {
        "config": config.output_fields(),
        "prompts": hashlib.sha256(prompts.encode()).hexdigest(),
        "labeller": labeller and hashlib.sha256(labeller.encode()).hexdigest(),
    }


# What builds did before a field existed, where that is not the field's default.
BEFORE_FIELD = {"banned_characters": "", "backend": "transformers", "prompt_format": "text"}
# What each checked part of a build's state stands for, in a refused resume's message.
STATE_PARTS = {
    "prompts": "rendered prompts (prompt source, templates or descriptor pairs)",
    "labeller": f"labeller ({COMPARE_FILE} or the scorer instructions)",
}


def _check_state(path: Path, state: dict) -> None:
    saved = json.loads(path.read_text())
    # A field added since the interrupted build was started has the value builds had before it existed.
    defaults = {f.name: f.default for f in dataclasses.fields(BuildConfig)}
    for k in state["config"]:
        saved["config"].setdefault(k, BEFORE_FIELD.get(k, defaults.get(k)))
    # A CPU build started before `auto` was recorded as what it chose saved "auto", which then meant float32.
    if saved["config"].get("dtype") == "auto" and state["config"].get("dtype") != "auto":
        import torch

        if not torch.cuda.is_available():
            saved["config"]["dtype"] = "float32"
    differ = [
        f"{k}: {saved['config'].get(k)!r} -> {state['config'].get(k)!r}"
        for k in sorted(set(saved["config"]) | set(state["config"]))
        if saved["config"].get(k) != state["config"].get(k)
    ]
    # A state written before the labeller was recorded separately (it hashed every task file instead)
    # is checked on its configuration and prompts.
    differ += [what for k, what in STATE_PARTS.items() if k in saved and saved[k] != state[k]]
    if differ:
        details = ", ".join(differ)
        raise RlcdError(f"cannot resume: the configuration differs from the interrupted build ({details})")

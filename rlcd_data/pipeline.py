"""`rlcd-data build`: prompts -> contrast pairs -> generations -> a Hub-ready dataset folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .chat import ChatRenderer, resolve_format
from .config import BuildConfig, RunOptions
from .decoding import Decoding
from .errors import RlcdError
from .generate import Generator
from .labeller import Labeller
from .methods import METHODS, base_row, label_rows, supported
from .models import load_tokenizer
from .progress import BuildProgress
from .prompts import PromptSet, load_prompts
from .staging import (
    DONE_FILE,
    STAGING,
    STATE_FILE,
    Parts,
    PartWriter,
    build_state,
    check_output,
    check_state,
    elapsed_before,
    read_parts,
    shard_dir,
    write_atomic,
)
from .tasks import ContrastPair, Task, load_task


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
    config: BuildConfig,
    options: RunOptions | None = None,
    generator: Generator | None = None,
    progress: bool = True,
    labeller: Labeller | None = None,
) -> BuildResult:
    """Build a preference dataset (RLCD or a baseline, see `rlcd_data.methods`) into ``config.output``.

    Args:
        config: what to build.
        options: how to run: overwrite, resume, which shard (default: a new build, unsharded).
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
    options = options or RunOptions()
    shard = options.shard()
    plan = prepare(config, None if generator is None else lambda: getattr(generator, "tokenizer", None))
    config, task, prompt_set, all_pairs = plan.config, plan.task, plan.prompt_set, plan.pairs
    if options.resume and shard is None and (finished := _finished_build(out, config)) is not None:
        return finished  # a requeued job running the same command again converges on the same dataset
    check_output(out, options.overwrite, options.resume, shard)
    staging = shard_dir(out, shard)
    if generator is None:  # which engine runs is part of the record too (resume refuses another)
        from .generate.backends import choose_backend

        # `auto` may choose another engine since the build was interrupted: a resumed build keeps its own.
        resumed = options.resume and config.backend == "auto"
        if resumed and (interrupted := _interrupted_backend(staging)):
            backend, why = interrupted, "the engine the interrupted build ran on"
        else:
            backend, why = choose_backend(config.backend, config.quantization, config.model)
        config = dataclasses.replace(config, backend=backend)
    # Shard k of n takes examples k, k + n, k + 2n, ...: every shard gets short and long prompts alike.
    pairs = all_pairs if shard is None else all_pairs[shard[0] :: shard[1]]
    state = build_state(config, task, all_pairs)
    previous = Parts()
    if options.resume:
        check_state(staging / STATE_FILE, state)
        previous = read_parts(staging)
        started -= elapsed_before(staging)  # the card's build time covers every run of the build
    else:
        _start_staging(staging, state)
    done = {r["source_index"] for r in previous.rows + previous.unlabelled} | set(previous.dropped)
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
        examples_dropped=len(previous.dropped),
        dropped_source_indices=list(previous.dropped),
    )
    rows, unlabelled = previous.rows, previous.unlabelled
    writer = PartWriter(staging, previous.next_part, started)
    bar = BuildProgress(len(pairs), len(pairs) - len(todo), f"{method.name} {config.task}", progress)

    def label() -> None:
        """Label the decoded pairs waiting for it, between generate calls, and save the labelled rows."""
        labelled = label_rows(unlabelled, method=method, task=task, labeller=labeller, seed=config.seed,
                              both_orders=config.label_both_orders, chat=plan.chat,
                              rationales=_rationale_writer(generator, config) if config.label_cot else None)
        writer.write(labelled)
        rows.extend(labelled)
        unlabelled.clear()

    def save(finished: list[tuple[int, dict | None]], call_over: bool) -> None:
        new = [base_row(todo[i], method, outputs, generator.count_tokens) for i, outputs in finished if outputs]
        lost = [todo[i].source_index for i, outputs in finished if outputs is None]
        stats.examples_dropped += len(lost)
        stats.dropped_source_indices += lost
        dropped = [{"dropped_source_index": k} for k in lost]  # a resume skips them too
        if method.scored:  # decoded pairs are saved before the labeller sees them
            writer.write([{"unlabelled": row} for row in new] + dropped)
            unlabelled.extend(new)
            if call_over and unlabelled:
                label()
        else:
            writer.write(new + dropped)
            rows.extend(new)

    try:
        if unlabelled:  # decoded before an interruption
            label()
        stats.outputs_retried = Decoding(todo, generator, config, method, bar, save).run()
        stats.generated_tokens = bar.tokens
    finally:
        bar.close()
        if opened and hasattr(generator, "close"):
            generator.close()  # a vLLM engine's processes and memory, now rather than at exit
    stats.pairs = len(rows)
    rows.sort(key=lambda r: r["source_index"])
    stats.dropped_source_indices.sort()
    stats.seconds = time.monotonic() - started
    if shard is not None:
        record = {"config": config.to_dict(), "stats": dataclasses.asdict(stats), "model": generator.description}
        write_atomic(staging / DONE_FILE, json.dumps(record, indent=2))
        result = BuildResult(out, config, stats, {}, generator.description, shard=shard)
        if options.num_shards is None:  # started by a launcher (RANK / WORLD_SIZE): rank 0 merges
            from .shards import merge_when_all_done

            return merge_when_all_done(out, result)
        return result
    if not rows:
        raise RlcdError(
            f"no pairs: all {len(pairs)} examples failed after {config.max_retries} retries "
            f"(every output was empty or cut off at --max-new-tokens {config.max_new_tokens}; try a larger limit)"
        )
    splits = output.write_dataset_folder(out, rows, config=config, task=task, stats=stats, model=generator.description)
    return BuildResult(out, config, stats, splits, generator.description)


def _rationale_writer(generator: Generator, config: BuildConfig):
    """--label-cot: the simulator continues comparison prompts greedily (top-k 1), up to COT_TOKENS tokens."""
    from .generate import SamplingSettings, request_seed
    from .methods import COT_TOKENS

    settings = SamplingSettings(max_new_tokens=COT_TOKENS, top_k=1, banned_characters=config.banned_characters)

    def write(prompts: list[str]) -> list[str]:
        seeds = [request_seed(config.seed, "rationale", i) for i in range(len(prompts))]  # greedy: no effect
        return [c.text for c in generator.generate(prompts, seeds, settings)]

    return write


def _start_staging(staging: Path, state: dict) -> None:
    """A new build's staging folder, with what it builds (parts of an earlier, different build go)."""
    if staging.exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir(parents=True)
        write_atomic(staging / STATE_FILE, json.dumps(state, indent=2))
    except OSError as e:
        raise RlcdError(f"{staging}: cannot write ({e.strerror})") from None


def _interrupted_backend(staging: Path) -> str | None:
    """The engine an interrupted build in ``staging`` recorded, if any."""
    path = staging / STATE_FILE
    backend = json.loads(path.read_text())["config"].get("backend") if path.is_file() else None
    return backend if backend in ("transformers", "vllm") else None


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

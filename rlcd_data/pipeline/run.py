"""`rlcd-data build`: prompts -> contrast pairs -> generations -> a Hub-ready dataset folder.

`build` takes its steps in order: plan (inputs checked, pairs rendered), stage (output folder, engine
choice, what an interrupted run left), open the engine, decode with retries (labelling and saving parts
as examples finish), write (the dataset folder, or a shard's record).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from ..errors import RlcdError
from ..generate.engine import Generator
from ..generate.labeller import Labeller
from .config import BuildConfig
from .decoding import Decoding
from .methods import METHODS, base_row, label_rows
from .plan import finished_build, interrupted_backend, prepare
from .progress import BuildProgress
from .results import BuildResult, BuildStats
from .run_options import RunOptions
from .staging import (
    DONE_FILE,
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


def build(
    config: BuildConfig,
    options: RunOptions | None = None,
    generator: Generator | None = None,
    progress: bool = True,
    labeller: Labeller | None = None,
) -> BuildResult:
    """Build a preference dataset (RLCD or a baseline, see `rlcd_data.pipeline.methods`) into ``config.output``.

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
    run = Build(config, options or RunOptions(), generator, progress)
    if run.finished is not None:
        return run.finished  # a requeued job running the same command again converges on the same dataset
    run.stage()
    try:
        run.open_engine(labeller)
        run.decode()
    finally:
        run.close()
    return run.write()


class Build:
    """One run of a build. Each step sets what the next one reads; `build` calls them in order."""

    def __init__(self, config: BuildConfig, options: RunOptions, generator: Generator | None, progress: bool):
        """Plan: check the inputs and render every pair before any model loads (bad input fails here)."""
        self.started = time.monotonic()
        self.options, self.generator, self.progress = options, generator, progress
        self.opened = generator is None  # the build opens (and closes) the engine itself
        if self.opened and not config.base_url:  # the model loads here: record what dtype `auto` stands for
            from ..generate.models import resolve_dtype

            config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, config.quantization))
        self.out, self.shard = Path(config.output), options.shard()
        self.plan = prepare(config, None if generator is None else lambda: getattr(generator, "tokenizer", None))
        self.config, self.method = self.plan.config, METHODS[self.plan.config.method]
        self.finished = finished_build(self.out, self.config) if options.resume and self.shard is None else None
        # Shard k of n takes examples k, k + n, k + 2n, ...: every shard gets short and long prompts alike.
        self.pairs = self.plan.pairs if self.shard is None else self.plan.pairs[self.shard[0] :: self.shard[1]]
        self.labeller: Labeller | None = None
        self.bar: BuildProgress | None = None

    def stage(self) -> None:
        """Check the output folder, choose the engine, and open the staging folder: a new one, or the
        interrupted run's (--resume), whose finished examples are not generated again."""
        check_output(self.out, self.options.overwrite, self.options.resume, self.shard)
        self.staging = shard_dir(self.out, self.shard)
        if self.opened:  # which engine runs is part of the record too (resume refuses another)
            self._choose_backend()
        state = build_state(self.config, self.plan.task, self.plan.pairs)
        previous = Parts()
        if self.options.resume:
            check_state(self.staging / STATE_FILE, state)
            previous = read_parts(self.staging)
            self.started -= elapsed_before(self.staging)  # the card's build time covers every run of the build
        else:
            _start_staging(self.staging, state)
        done = {r["source_index"] for r in previous.rows + previous.unlabelled} | set(previous.dropped)
        self.todo = [p for p in self.pairs if p.source_index not in done]
        prompt_set = self.plan.prompt_set
        self.stats = BuildStats(
            prompts_read=prompt_set.read,
            prompts_dropped_empty=prompt_set.dropped_empty,
            prompts_dropped_duplicate=prompt_set.dropped_duplicate,
            prompts_used=len(self.pairs),
            examples_dropped=len(previous.dropped),
            dropped_source_indices=list(previous.dropped),
        )
        self.rows, self.unlabelled = previous.rows, previous.unlabelled
        self.writer = PartWriter(self.staging, previous.next_part, self.started)

    def _choose_backend(self) -> None:
        from ..generate.backends import choose_backend

        # `auto` may choose another engine since the build was interrupted: a resumed build keeps its own.
        resumed = self.options.resume and self.config.backend == "auto"
        if resumed and (interrupted := interrupted_backend(self.staging)):
            backend, self.why = interrupted, "the engine the interrupted build ran on"
        else:
            backend, self.why = choose_backend(self.config.backend, self.config.quantization, self.config.model)
        self.config = dataclasses.replace(self.config, backend=backend)

    def open_engine(self, labeller: Labeller | None) -> None:
        """Open the model (unless the caller gave one) and, for scored methods, the A/B labeller: by default
        the generator's own model (no second copy)."""
        self.labeller = labeller
        if self.opened:
            from ..generate.backends import open_generator

            self.generator, make_labeller = open_generator(self.config)
            if self.method.scored and labeller is None:
                self.labeller = make_labeller()
            if self.progress:
                print(f"rlcd-data: generating with {self.config.backend} ({self.why})", file=sys.stderr)
        elif self.method.scored and labeller is None:
            from ..generate.labeller import TransformersLabeller

            if not hasattr(self.generator, "model"):
                raise RlcdError(f"--method {self.method.name} needs a labeller for this generator")
            self.labeller = TransformersLabeller(self.generator.model, self.generator.tokenizer,
                                                 self.config.batch_size)

    def decode(self) -> None:
        """Sample every pending example's outputs, retrying failed ones; finished examples are labelled
        (scored methods) and saved to the staging folder as they come."""
        self.bar = BuildProgress(len(self.pairs), len(self.pairs) - len(self.todo),
                                 f"{self.method.name} {self.config.task}", self.progress,
                                 status=getattr(self.generator, "status", None))
        if self.unlabelled:  # decoded before an interruption
            self._label()
        self.stats.outputs_retried = Decoding(self.todo, self.generator, self.config, self.method, self.bar,
                                              self._save).run()
        self.stats.generated_tokens = self.bar.tokens
        server = getattr(self.generator, "server", None)  # a model server: its retries and label gaps
        self.stats.requests_retried = server.retried if server else 0
        self.stats.labels_missing_tokens = getattr(self.labeller, "missing_labels", 0)

    def _save(self, finished: list[tuple[int, dict | None]], call_over: bool) -> None:
        """Stage finished examples: their rows (decoded pairs wait for the labeller in scored methods) and
        the dropped ones, which a resume skips too."""
        new = [base_row(self.todo[i], self.method, outputs, self.generator.count_tokens)
               for i, outputs in finished if outputs]
        lost = [self.todo[i].source_index for i, outputs in finished if outputs is None]
        self.stats.examples_dropped += len(lost)
        self.stats.dropped_source_indices += lost
        dropped = [{"dropped_source_index": k} for k in lost]
        if self.method.scored:  # decoded pairs are saved before the labeller sees them
            self.writer.write([{"unlabelled": row} for row in new] + dropped)
            self.unlabelled.extend(new)
            if call_over and self.unlabelled:
                self._label()
        else:
            self.writer.write(new + dropped)
            self.rows.extend(new)

    def _label(self) -> None:
        """Label the decoded pairs waiting for it, between generate calls, and save the labelled rows."""
        config = self.config
        rationales = _rationale_writer(self.generator, config) if config.label_cot else None
        labelled = label_rows(self.unlabelled, method=self.method, task=self.plan.task, labeller=self.labeller,
                              seed=config.seed, both_orders=config.label_both_orders, chat=self.plan.chat,
                              rationales=rationales)
        self.writer.write(labelled)
        self.rows.extend(labelled)
        self.unlabelled.clear()

    def close(self) -> None:
        """Close the progress bar, and the engine if the build opened it (a vLLM engine's processes and
        memory, now rather than at exit)."""
        if self.bar is not None:
            self.bar.close()
        if self.opened and self.generator is not None and hasattr(self.generator, "close"):
            self.generator.close()

    def write(self) -> BuildResult:
        """Finish: a shard's record for `merge` (rank 0 of a launcher merges), or the dataset folder."""
        from . import output

        stats, config, model = self.stats, self.config, self.generator.description
        stats.pairs = len(self.rows)
        self.rows.sort(key=lambda r: r["source_index"])
        stats.dropped_source_indices.sort()
        stats.seconds = time.monotonic() - self.started
        if self.shard is not None:
            record = {"config": config.to_dict(), "stats": dataclasses.asdict(stats), "model": model}
            write_atomic(self.staging / DONE_FILE, json.dumps(record, indent=2))
            result = BuildResult(self.out, config, stats, {}, model, shard=self.shard)
            if self.options.num_shards is None:  # started by a launcher (RANK / WORLD_SIZE): rank 0 merges
                from .shards import merge_when_all_done

                return merge_when_all_done(self.out, result)
            return result
        if not self.rows:
            raise RlcdError(
                f"no pairs: all {len(self.pairs)} examples failed after {config.max_retries} retries "
                f"(every output was empty or cut off at --max-new-tokens {config.max_new_tokens}; try a larger limit)"
            )
        splits = output.write_dataset_folder(self.out, self.rows, config=config, task=self.plan.task, stats=stats,
                                             model=model)
        return BuildResult(self.out, config, stats, splits, model)


def _rationale_writer(generator: Generator, config: BuildConfig):
    """--label-cot: the simulator continues comparison prompts greedily (top-k 1), up to COT_TOKENS tokens."""
    from ..generate.engine import SamplingSettings, request_seed
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

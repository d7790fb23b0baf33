"""Crash safety: completed pairs survive an interruption or kill -9, and --resume finishes the build."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import QueueGenerator

from rlcd_data.cli import main
from rlcd_data.errors import RlcdError
from rlcd_data.pipeline.config import BuildConfig
from rlcd_data.pipeline.run import build
from rlcd_data.pipeline.run_options import RunOptions
from rlcd_data.tasks.catalog import list_tasks


def prompts_file(tmp_path, n=6):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(n)))
    return path


def interrupted_build(tmp_path, fake_generator, labeller=None, **overrides):
    def respond(prompt, n):
        if "Question number 4?" in prompt:
            raise KeyboardInterrupt
        return "ok", True

    config = dict(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(tmp_path / "out"), batch_size=1)
    # The generator reports each output as it finishes: pairs 0-3 are written before the interrupt.
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(**{**config, **overrides}), generator=QueueGenerator(respond), labeller=labeller, progress=False)
    return {**config, **overrides}


def interrupt_on_transformers(config: BuildConfig, monkeypatch) -> None:
    """Start ``config``'s build on the transformers backend and interrupt it in its first generate call."""
    from rlcd_data.generate import TransformersGenerator

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(TransformersGenerator, "generate", interrupt)
        with pytest.raises(KeyboardInterrupt):
            build(config, progress=False)


def test_resume_generates_only_what_is_missing(tmp_path, fake_generator):
    import datasets

    config = interrupted_build(tmp_path, fake_generator)
    with pytest.raises(RlcdError, match="or --resume to continue it"):
        build(BuildConfig(**config), generator=fake_generator(), progress=False)
    generator = fake_generator()
    result = build(BuildConfig(**config), RunOptions(resume=True), generator=generator, progress=False)
    asked = {p.split("Question number ")[1].split("?")[0] for call in generator.requests for p in call}
    assert asked == {"4", "5"}  # pairs 0-3 were done before the interruption
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train").to_list()
    assert [r["source_index"] for r in rows] == list(range(6)) and result.stats.pairs == 6
    assert not (tmp_path / "out" / ".rlcd-build").exists()
    import yaml

    assert "resume" not in yaml.safe_load((tmp_path / "out" / "rlcd_build.yaml").read_text())


def test_a_resumed_builds_time_includes_its_interrupted_runs(tmp_path, fake_generator):
    config = interrupted_build(tmp_path, fake_generator)
    elapsed = tmp_path / "out" / ".rlcd-build" / "elapsed.json"
    assert json.loads(elapsed.read_text())["seconds"] >= 0  # written with every completed part
    elapsed.write_text(json.dumps({"seconds": 1234.0}))  # as if the first run had taken that long
    result = build(BuildConfig(**config), RunOptions(resume=True), generator=fake_generator(), progress=False)
    assert 1234.0 <= result.stats.seconds < 1234.0 + 60
    assert "| build time | 1234 s |" in (tmp_path / "out" / "README.md").read_text()


def test_resume_with_a_different_configuration_is_refused(tmp_path, fake_generator):
    root = tmp_path / "templates"
    shutil.copytree(list_tasks()["harmless"], root / "harmless")
    config = interrupted_build(tmp_path, fake_generator, templates=str(root))
    with pytest.raises(RlcdError, match=r"cannot resume: .*seed: 0 -> 7"):
        build(BuildConfig(**{**config, "seed": 7}), RunOptions(resume=True), generator=fake_generator(), progress=False)
    with pytest.raises(RlcdError, match=r"cannot resume: .*max_new_tokens: 300 -> 10"):
        build(BuildConfig(**{**config, "max_new_tokens": 10}), RunOptions(resume=True), generator=fake_generator(), progress=False)
    # the same configuration, with an edited template in the same folder: the rendered prompts differ
    edit(root / "harmless" / "p_plus.jinja", "Assistant (", "Assistant [(")
    with pytest.raises(RlcdError, match=r"cannot resume: .*\(rendered prompts \(prompt source, templates") as refused:
        build(BuildConfig(**config), RunOptions(resume=True), generator=fake_generator(), progress=False)
    assert "templates:" not in str(refused.value)  # refused for the render, not for a changed option
    edit(root / "harmless" / "p_plus.jinja", "Assistant [(", "Assistant (")
    # a different batch size is fine: it does not change what is built
    build(BuildConfig(**{**config, "batch_size": 8}), RunOptions(resume=True), generator=fake_generator(), progress=False)


class EvenLabeller:
    """A labeller with no preference."""

    def first_option_probability(self, prompts):
        return [0.5] * len(prompts)


def edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_resume_checks_the_task_files_the_method_uses(tmp_path, fake_generator):
    root = tmp_path / "templates"
    shutil.copytree(list_tasks()["harmless"], root / "harmless")
    task = root / "harmless"
    config = interrupted_build(tmp_path, fake_generator, templates=str(root))
    # Neither the README nor the labeller's template changes what an rlcd build makes.
    edit(task / "README.md", "RLCD", "RLCD (edited)")
    edit(task / "compare.jinja", "The answer is: (", "Answer now.\nThe answer is: (")
    edit(task / "task.yaml", "scorer:", "# a comment\nscorer:")
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "out", tmp_path / "resumed" / "out")
    result = build(BuildConfig(**{**config, "output": str(tmp_path / "resumed" / "out")}), RunOptions(resume=True),
                   generator=fake_generator(), progress=False)
    assert result.stats.pairs == 6
    # A template the prompts are rendered from does.
    edit(task / "p_plus.jinja", "Assistant (", "Assistant [(")
    with pytest.raises(RlcdError, match=r"cannot resume: .*\(rendered prompts \(prompt source, templates"):
        build(BuildConfig(**config), RunOptions(resume=True), generator=fake_generator(), progress=False)


def test_resume_of_a_scored_build_checks_its_labeller(tmp_path, fake_generator):
    root = tmp_path / "templates"
    shutil.copytree(list_tasks()["harmless"], root / "harmless")
    config = interrupted_build(tmp_path, fake_generator, EvenLabeller(), templates=str(root), method="rlcd-rescore")
    edit(root / "harmless" / "compare.jinja", "The answer is: (", "Answer now.\nThe answer is: (")
    with pytest.raises(RlcdError, match=r"cannot resume: .*\(labeller \(compare.jinja or the scorer instructions"):
        build(BuildConfig(**config), RunOptions(resume=True), generator=fake_generator(), labeller=EvenLabeller(), progress=False)
    edit(root / "harmless" / "compare.jinja", "Answer now.\nThe answer is: (", "The answer is: (")
    result = build(BuildConfig(**config), RunOptions(resume=True), generator=fake_generator(), labeller=EvenLabeller(), progress=False)
    assert result.stats.pairs == 6


def test_a_build_from_before_token_bans_resumes_without_them(tmp_path, fake_generator):
    config = interrupted_build(tmp_path, fake_generator)
    state_file = tmp_path / "out" / ".rlcd-build" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["banned_characters"]  # as written before the field existed
    state_file.write_text(json.dumps(state))
    with pytest.raises(RlcdError, match=r"cannot resume: .*banned_characters: '' -> '\\\\`'"):
        build(BuildConfig(**config), RunOptions(resume=True), generator=fake_generator(), progress=False)
    result = build(BuildConfig(**config, banned_characters=""), RunOptions(resume=True), generator=fake_generator(), progress=False)
    assert result.stats.pairs == 6


def test_resume_needs_an_interrupted_build(tmp_path, fake_generator):
    with pytest.raises(RlcdError, match="nothing to resume"):
        build(BuildConfig(task="harmless", output=str(tmp_path / "none")), RunOptions(resume=True), generator=fake_generator())


def test_resume_of_a_finished_build_succeeds_without_generating(tmp_path, fake_generator, capsys, monkeypatch):
    """A requeued job runs the same command again: it converges on the same dataset, exit 0."""
    config = dict(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(tmp_path / "out"))
    build(BuildConfig(**config), generator=fake_generator(), progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    generator = fake_generator()
    result = build(BuildConfig(**config), RunOptions(resume=True), generator=generator, progress=False)
    assert result.complete_before and result.stats.pairs == 6 and result.splits == {"train": 6}
    assert generator.requests == []
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    with pytest.raises(RlcdError, match=r"finished build with another configuration \(seed: 0 -> 3\)"):
        build(BuildConfig(**config, seed=3), RunOptions(resume=True), generator=fake_generator(), progress=False)
    import rlcd_data.pipeline.run as pipeline

    monkeypatch.setattr(pipeline, "build", lambda config, options=None, **kw: result)
    assert main(["build", "harmless", "--prompts", config["prompts"], "--output", config["output"], "--resume"]) == 0
    assert "already complete (6 pairs)" in capsys.readouterr().out


def _args(tiny_model_dir, hh_dir):
    return ["build", "harmless", "--model", str(tiny_model_dir), "--prompts", str(hh_dir / "harmless-base-prompts.jsonl"),
            "--limit", "12", "--batch-size", "1", "--max-new-tokens", "40", "--backend", "transformers"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, hh_dir):
    import datasets

    out = tmp_path_factory.mktemp("whole") / "whole"
    assert main([*_args(tiny_model_dir, hh_dir), "--output", str(out)]) == 0
    return datasets.load_dataset(str(out), split="train").to_list()


def _start_and_stop_after(args, out, parts, sig):
    """Run a build in a subprocess and send it ``sig`` once ``parts`` part files exist."""
    # A shell without job control starts background commands with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the build the default disposition whatever runs the tests.
    process = subprocess.Popen([sys.executable, "-m", "rlcd_data", *args, "--output", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while len(list((out / ".rlcd-build").glob("part-*.jsonl"))) < parts and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(sig)
    _, err = process.communicate()
    return process.returncode, err


def _same_as_uninterrupted(out, uninterrupted):
    import datasets

    resumed = datasets.load_dataset(str(out), split="train").to_list()
    indices = [r["source_index"] for r in resumed]
    assert indices == sorted(set(indices))  # each prompt once, in input order
    # Per-example descriptor draws and sampling seeds: the resumed build equals an uninterrupted one.
    key = lambda r: (r["source_index"], r["descriptor_index"], r["chosen"], r["rejected"])  # noqa: E731
    assert [key(r) for r in resumed] == [key(r) for r in uninterrupted]


@pytest.mark.parametrize("parts", [1, 3])
def test_kill_9_loses_at_most_the_batch_in_flight(tmp_path, tiny_model_dir, hh_dir, uninterrupted, capsys, parts):
    args = _args(tiny_model_dir, hh_dir)
    out = tmp_path / "killed"
    _start_and_stop_after(args, out, parts, signal.SIGKILL)
    written = sorted((out / ".rlcd-build").glob("part-*.jsonl"))
    assert len(written) >= parts
    kept = [json.loads(line) for p in written for line in p.read_text().splitlines()]
    assert len(kept) >= parts  # the parts written before the kill are whole, valid JSON
    # A kill during a write leaves at most that one part's temporary file, which no reader takes for a part.
    # Make sure one is there, half written, whenever the kill came.
    stale = list((out / ".rlcd-build").glob("*.tmp"))
    assert len(stale) <= 1
    if not stale:
        (out / ".rlcd-build" / f"part-{len(written):06d}.jsonl.tmp").write_text('{"source_index": 9, "cho')
    assert main([*args, "--output", str(out), "--resume"]) == 0
    capsys.readouterr()
    _same_as_uninterrupted(out, uninterrupted)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # the resumed build leaves none behind


def test_sigint_keeps_completed_pairs_and_says_how_to_resume(tmp_path, tiny_model_dir, hh_dir, uninterrupted, capsys):
    args = _args(tiny_model_dir, hh_dir)
    out = tmp_path / "interrupted"
    code, err = _start_and_stop_after(args, out, 2, signal.SIGINT)
    assert code == 130
    assert "--resume" in err and "Traceback" not in err
    assert len(list((out / ".rlcd-build").glob("part-*.jsonl"))) >= 2
    assert main([*args, "--output", str(out), "--resume"]) == 0
    capsys.readouterr()
    _same_as_uninterrupted(out, uninterrupted)


def test_disk_full_is_a_clear_error_and_earlier_parts_stay_valid(tmp_path, fake_generator, monkeypatch):
    import errno
    import os

    import datasets

    from rlcd_data.pipeline import staging as staging_module

    writes = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        writes["n"] += 1
        if writes["n"] == 4:  # state.json, part 0 (pair 0), elapsed.json, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(staging_module.os, "fsync", fsync)
    config = dict(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(tmp_path / "out"), batch_size=1)
    with pytest.raises(RlcdError, match=r"cannot write part 1 \(No space left on device\); the parts written before"):
        build(BuildConfig(**config), generator=QueueGenerator(), progress=False)
    staging = tmp_path / "out" / ".rlcd-build"
    # no half-written file
    assert sorted(p.name for p in staging.iterdir()) == ["elapsed.json", "part-000000.jsonl", "state.json"]
    monkeypatch.setattr(staging_module.os, "fsync", real_fsync)
    build(BuildConfig(**config), RunOptions(resume=True), generator=fake_generator(), progress=False)
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train").to_list()
    assert [r["source_index"] for r in rows] == list(range(6))


class StreamingGenerator:
    """Reports each output as it finishes (like the real generator) and is interrupted at question 4."""

    description = "streaming fake"

    def generate(self, prompts, seeds, settings, on_progress=None):
        from rlcd_data.generate import Completion

        out = []
        for i, prompt in enumerate(prompts):
            if "Question number 4?" in prompt:
                raise KeyboardInterrupt
            out.append(Completion("ok", 1, True))
            on_progress([(i, out[-1])], 1)
        return out

    def count_tokens(self, text):
        return 1


def test_an_interrupt_keeps_the_pairs_completed_in_the_call_under_way(tmp_path, fake_generator):
    """Pairs 0-3 finish inside the interrupted generate() call (fewer than the half batch that triggers a
    write): the interrupt writes them before stopping, and --resume generates only 4 and 5."""
    config = dict(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(tmp_path / "out"), batch_size=16)
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(**config), generator=StreamingGenerator(), progress=False)
    parts = sorted((tmp_path / "out" / ".rlcd-build").glob("part-*.jsonl"))
    kept = [json.loads(line)["source_index"] for p in parts for line in p.read_text().splitlines()]
    assert kept == [0, 1, 2, 3]
    generator = fake_generator()
    build(BuildConfig(**config), RunOptions(resume=True), generator=generator, progress=False)
    assert {p.split("number ")[1][0] for call in generator.requests for p in call} == {"4", "5"}


def test_auto_dtype_is_recorded_as_what_it_chose_and_a_resume_choosing_otherwise_is_refused(
    tmp_path, tiny_model_dir, monkeypatch
):
    """`--dtype auto` is bf16 on a CPU with native bf16, fp32 on another; the build records the choice,
    so a resume on a machine where auto means something else is refused instead of mixing dtypes."""
    import torch
    import yaml

    from rlcd_data.generate import models

    assert models.resolve_dtype("float32", "none") == "float32"
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.resolve_dtype("auto", "none") == "bfloat16"
    assert models.resolve_dtype("auto", "8bit") == "float32"  # bitsandbytes' CPU kernels take fp32 inputs
    config = dict(task="harmless", model=str(tiny_model_dir), prompts=str(prompts_file(tmp_path, n=3)),
                  output=str(tmp_path / "out"), max_new_tokens=40, backend="transformers")
    loaded = []  # the dtype of each model the builds load
    load = models.load_causal_lm

    def spy(*args):
        model, tokenizer, source = load(*args)
        loaded.append(model.dtype)
        return model, tokenizer, source

    monkeypatch.setattr(models, "load_causal_lm", spy)
    interrupt_on_transformers(BuildConfig(**config), monkeypatch)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(RlcdError, match=r"cannot resume: .*dtype: 'bfloat16' -> 'float32'"):
        build(BuildConfig(**config), RunOptions(resume=True), progress=False)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    build(BuildConfig(**config), RunOptions(resume=True), progress=False)
    assert loaded == [torch.bfloat16, torch.bfloat16]
    out = tmp_path / "out"
    assert yaml.safe_load((out / "rlcd_build.yaml").read_text())["dtype"] == "bfloat16"
    assert "dtype `bfloat16`" in (out / "README.md").read_text()


def test_resume_with_backend_auto_keeps_the_interrupted_builds_engine(tmp_path, tiny_model_dir, monkeypatch):
    """`auto` now picks vLLM where a build interrupted earlier ran on transformers: the resume keeps transformers."""
    import yaml

    from rlcd_data.generate import backends

    config = dict(task="harmless", model=str(tiny_model_dir), prompts=str(prompts_file(tmp_path, n=3)),
                  output=str(tmp_path / "out"), max_new_tokens=40, dtype="float32")
    interrupt_on_transformers(BuildConfig(**config, backend="transformers"), monkeypatch)
    monkeypatch.setattr(backends, "choose_backend", lambda *a: ("vllm", "vLLM is installed"))
    result = build(BuildConfig(**config), RunOptions(resume=True), progress=False)
    assert result.stats.pairs >= 1
    assert yaml.safe_load((tmp_path / "out" / "rlcd_build.yaml").read_text())["backend"] == "transformers"


def test_a_cpu_build_that_recorded_auto_resumes_as_the_float32_it_ran_in(tmp_path, tiny_model_dir, monkeypatch):
    """Builds started before `auto` was recorded as what it chose saved "auto" (then float32 on CPU):
    they resume in float32, and are refused where auto now means bf16."""
    import json

    from rlcd_data.generate import models
    from rlcd_data.pipeline.staging import STAGING, STATE_FILE

    config = dict(task="harmless", model=str(tiny_model_dir), prompts=str(prompts_file(tmp_path, n=3)),
                  output=str(tmp_path / "out"), max_new_tokens=40, backend="transformers")
    interrupt_on_transformers(BuildConfig(**config, dtype="float32"), monkeypatch)
    state_file = tmp_path / "out" / STAGING / STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["config"]["dtype"] == "float32"
    state["config"]["dtype"] = "auto"  # as an older rlcd-data recorded it
    state_file.write_text(json.dumps(state))
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    with pytest.raises(RlcdError, match=r"cannot resume: .*dtype: 'float32' -> 'bfloat16'"):
        build(BuildConfig(**config), RunOptions(resume=True), progress=False)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    result = build(BuildConfig(**config), RunOptions(resume=True), progress=False)
    assert result.stats.pairs > 0


class WatchedGenerator(StreamingGenerator):
    """Streams outputs like the real generator and remembers whether a generate() call is under way."""

    def __init__(self, interrupt_at: str | None = None):
        self.busy = False
        self.interrupt_at = interrupt_at
        self.asked: list[str] = []

    def generate(self, prompts, seeds, settings, on_progress=None):
        from rlcd_data.generate import Completion

        self.busy = True
        try:
            out = []
            for i, prompt in enumerate(prompts):
                if self.interrupt_at and self.interrupt_at in prompt:
                    raise KeyboardInterrupt
                self.asked.append(prompt)
                out.append(Completion(f"answer {len(self.asked)}", 2, True))
                on_progress([(i, out[-1])], 2)
            return out
        finally:
            self.busy = False


class CheckedLabeller(EvenLabeller):
    """Fails the build if asked to label while the generator is decoding."""

    def __init__(self, generator):
        self.generator = generator
        self.labelled = 0

    def first_option_probability(self, prompts):
        assert not self.generator.busy, "labelled during a generate() call"
        self.labelled += len(prompts)
        return super().first_option_probability(prompts)


@pytest.mark.parametrize("method", ["rlaif", "rlcd-rescore"])
def test_scored_methods_label_between_generate_calls(tmp_path, method):
    generator = WatchedGenerator()
    labeller = CheckedLabeller(generator)
    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(tmp_path / "out"),
                         batch_size=2, method=method)
    result = build(config, generator=generator, labeller=labeller, progress=False)
    assert result.stats.pairs == 6 and labeller.labelled == 6


def test_an_interrupted_scored_build_keeps_its_decoded_pairs_and_labels_them_on_resume(tmp_path):
    """Pairs 0-3 are decoded, then the interrupt comes before the call ends (before labelling): they are
    kept unlabelled, and --resume labels them without generating them again."""
    import datasets

    config = dict(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(tmp_path / "out"), batch_size=16,
                  method="rlaif")
    first = WatchedGenerator(interrupt_at="Question number 4?")
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(**config), generator=first, labeller=CheckedLabeller(first), progress=False)
    parts = sorted((tmp_path / "out" / ".rlcd-build").glob("part-*.jsonl"))
    records = [json.loads(line) for p in parts for line in p.read_text().splitlines()]
    assert [r["unlabelled"]["source_index"] for r in records] == [0, 1, 2, 3]
    kept = {r["unlabelled"]["source_index"]: r["unlabelled"]["chosen"] for r in records}
    second = WatchedGenerator()
    labeller = CheckedLabeller(second)
    build(BuildConfig(**config), RunOptions(resume=True), generator=second, labeller=labeller, progress=False)
    assert {p.split("number ")[1][0] for p in second.asked} == {"4", "5"}
    assert labeller.labelled == 6
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train").to_list()
    assert [r["source_index"] for r in rows] == list(range(6))
    assert all(r["chosen_probability"] == 0.5 for r in rows)
    assert all(kept[i] in (rows[i]["chosen"].strip(), rows[i]["rejected"].strip()) for i in kept)

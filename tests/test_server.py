"""Builds through an OpenAI-compatible server (`--backend openai --base-url`), against a fault-injecting fake
server on 127.0.0.1 (tests/fake_openai_server.py): what reaches the server, retries, errors, secrets, resume."""

import json
import signal
import subprocess
import sys
import time

import pytest
from fake_openai_server import FakeServer

from rlcd_data import BuildConfig, build
from rlcd_data.cli import main
from rlcd_data.errors import RlcdError
from rlcd_data.generate.server import public_url
from rlcd_data.pipeline.methods import METHODS
from rlcd_data.pipeline.plan import prepare


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.stop()


def config(fake, tokenizer, out, **kw) -> BuildConfig:
    kw.setdefault("prompt_format", "text")
    kw.setdefault("limit", 6)
    return BuildConfig(task="harmless", output=str(out), base_url=fake.url, model=fake.model,
                       tokenizer=str(tokenizer), **kw)


def rows(out) -> list[dict]:
    import datasets

    return datasets.load_dataset(str(out), split="train").to_list()


def key(r):
    return r["source_index"], r["descriptor_index"], r["chosen"], r["rejected"]


@pytest.mark.parametrize("prompt_format", ["text", "chat"])
def test_the_server_gets_the_rendered_prompts_with_a_seed_and_every_sampling_parameter(
        server, tiny_model_dir, tmp_path, prompt_format):
    cfg = config(server, tiny_model_dir, tmp_path / "out", prompt_format=prompt_format, temperature=0.8, top_p=0.9,
                 top_k=40, repetition_penalty=1.1)
    result = build(cfg, progress=False)
    assert result.stats.pairs == 6 and result.config.prompt_format == prompt_format
    plan = prepare(cfg)
    rendered = {METHODS["rlcd"].request_text(p, side) for p in plan.pairs for side in ("p_plus", "p_minus")}
    assert {b["prompt"] for b in server.completions} == rendered
    assert len(server.completions) == 12  # no speculative later attempts: a server charges for each request
    assert len({b["seed"] for b in server.completions}) == 12
    from transformers import AutoTokenizer

    from rlcd_data.generate.engine import banned_token_ids

    banned = set(banned_token_ids(AutoTokenizer.from_pretrained(tiny_model_dir), "\\`"))
    for body in server.completions:
        assert body["model"] == server.model and body["max_tokens"] == 300 and body["n"] == 1
        assert (body["temperature"], body["top_p"], body["top_k"], body["repetition_penalty"]) == (0.8, 0.9, 40, 1.1)
        assert body["stop"] == ["\nHuman", "Human:"] and body["include_stop_str_in_output"] is True
        assert body["add_special_tokens"] is False  # the string as rendered, no BOS added by the server
        assert banned and not banned & set(body["allowed_token_ids"]) and 0 in body["allowed_token_ids"]
    data = rows(tmp_path / "out")
    assert all(r["chosen"].strip().startswith("Reply ") and "Human" not in r["chosen"] for r in data)  # cut at the stop
    saved = (tmp_path / "out" / "rlcd_build.yaml").read_text()
    assert "backend: openai" in saved and f"base_url: {server.url}" in saved
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{server.model} on {server.url} (vllm server, completions API)" in card


def test_another_server_gets_openai_parameters_only_and_banned_characters_are_retried(tiny_model_dir, tmp_path):
    fake = FakeServer(kind="openai-compatible", backticks=True, option_tokens={"A": 0, "B": 0})
    try:
        result = build(config(fake, tiny_model_dir, tmp_path / "out"), progress=False)
        assert not {"allowed_token_ids", "top_k", "add_special_tokens"} & {k for b in fake.completions for k in b}
        assert result.stats.outputs_retried > 0 and result.stats.pairs + result.stats.examples_dropped == 6
        assert not any("`" in r["chosen"] + r["rejected"] for r in rows(tmp_path / "out"))
        with pytest.raises(RlcdError, match="not vLLM: --top-k"):
            build(config(fake, tiny_model_dir, tmp_path / "k", top_k=5), progress=False)
        cot = build(config(fake, tiny_model_dir, tmp_path / "cot", method="rlaif", label_cot=True, limit=2),
                    progress=False)  # the rationales are greedy: temperature 0, not top-k 1
        assert cot.stats.pairs == 2
        assert any(b["temperature"] == 0.0 and b["max_tokens"] > 1 for b in fake.completions)
    finally:
        fake.stop()


def test_a_label_token_missing_from_the_top_k_is_bounded_and_counted(tiny_model_dir, tmp_path):
    fake = FakeServer(kind="openai-compatible", option_tokens={"A": 0, "Sure": 0})  # B is never among them
    try:
        result = build(config(fake, tiny_model_dir, tmp_path / "out", method="rlaif", limit=3), progress=False)
    finally:
        fake.stop()
    # B is given the lowest log-probability returned (an upper bound on its own), and every label is counted
    assert result.stats.labels_missing_tokens == 3 and result.stats.pairs == 3
    line = next(x for x in (tmp_path / "out" / "README.md").read_text().splitlines() if "label token missing" in x)
    assert line.endswith("| 3 |")


def test_requests_in_flight_stay_within_max_concurrency(tiny_model_dir, tmp_path):
    fake = FakeServer(delay=0.05)
    try:
        build(config(fake, tiny_model_dir, tmp_path / "out", max_concurrency=3), progress=False)
        assert 1 < fake.max_active <= 3
    finally:
        fake.stop()


def test_a_request_rate_spaces_the_requests_out(tiny_model_dir, tmp_path):
    fake = FakeServer()
    try:
        build(config(fake, tiny_model_dir, tmp_path / "out", limit=8, request_rate=20), progress=False)
    finally:
        fake.stop()
    gaps = sorted(b - a for a, b in zip(fake.arrivals, fake.arrivals[1:]))
    # started 1/20 s apart (15 gaps, 0.75 s); arrivals add connection jitter, so: most gaps, and the span
    assert len(gaps) == 15 and gaps[7] > 0.04 and sum(gaps) > 13 / 20


def test_rlaif_labels_come_from_the_logprobs_of_the_option_tokens(server, tiny_model_dir, tmp_path):
    result = build(config(server, tiny_model_dir, tmp_path / "out", method="rlaif"), progress=False)
    assert result.stats.pairs == 6
    labels = [b for b in server.completions if b["max_tokens"] == 1]
    from transformers import AutoTokenizer

    from rlcd_data.generate.labeller import option_token_ids

    options = list(option_token_ids(AutoTokenizer.from_pretrained(tiny_model_dir)))
    assert len(labels) == 7 and all(b["logprob_token_ids"] == options for b in labels)  # a probe, then 6 labels
    probabilities = [r["chosen_probability"] for r in rows(tmp_path / "out")]
    assert all(0.5 <= p <= 1 for p in probabilities) and len(set(probabilities)) > 1


@pytest.mark.parametrize("faults", [["429", "500", "429"], ["malformed", "drop", "malformed"], ["hang"]])
def test_faults_are_retried_and_the_rows_equal_a_build_without_them(tiny_model_dir, tmp_path, faults):
    clean = FakeServer()
    try:
        build(config(clean, tiny_model_dir, tmp_path / "clean"), progress=False)
    finally:
        clean.stop()
    fake = FakeServer()
    fake.faults = list(faults)
    try:
        timeout = 2.0 if "hang" in faults else 600.0  # the fake hangs for 5 s
        build(config(fake, tiny_model_dir, tmp_path / "faulty", request_timeout=timeout), progress=False)
    finally:
        fake.stop()
    assert not fake.faults  # every fault was served
    assert [key(r) for r in rows(tmp_path / "faulty")] == [key(r) for r in rows(tmp_path / "clean")]
    card = (tmp_path / "faulty" / "README.md").read_text()
    retried = int(next(x for x in card.splitlines() if "server requests retried" in x).split("|")[-2])
    # each fault costs one retry; a short timeout may time out a slow answer on a busy machine too
    assert retried == len(faults) if "hang" not in faults else retried >= 1


def one_line_error(argv, capsys) -> str:
    """The error of a failing command: one line, the last on stderr (after any progress), no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n") and "Traceback" not in err
    return errors[0]


def cli(fake_url, model, tokenizer, out, *more):
    return ["build", "harmless", "--limit", "4", "--output", str(out), "--base-url", fake_url, "--model", model,
            "--tokenizer", str(tokenizer), "--prompt-format", "text", *more]


def test_bad_servers_are_one_line_errors(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RLCD_TEST_KEY", "sk-secret-123")
    fake = FakeServer(api_key="sk-right")
    try:
        args = cli(fake.url, fake.model, tiny_model_dir, tmp_path / "a", "--api-key-env", "RLCD_TEST_KEY")
        err = one_line_error(args, capsys)
        assert "HTTP 401" in err and "RLCD_TEST_KEY" in err and "sk-secret-123" not in err
        monkeypatch.setenv("RLCD_TEST_KEY", "sk-right")
        err = one_line_error(cli(fake.url, "other-model", tiny_model_dir, tmp_path / "b", "--api-key-env",
                                 "RLCD_TEST_KEY"), capsys)
        assert "does not serve model 'other-model'" in err and fake.model in err
    finally:
        fake.stop()
    err = one_line_error(cli(fake.url, fake.model, tiny_model_dir, tmp_path / "c"), capsys)  # it is stopped
    assert f"cannot reach the server at {fake.url}" in err
    err = one_line_error(cli("http://no-such-host.invalid/v1", "m", tiny_model_dir, tmp_path / "d"), capsys)
    assert "cannot reach the server at http://no-such-host.invalid/v1" in err
    bare = FakeServer(logprobs=False)
    try:
        err = one_line_error(cli(bare.url, bare.model, tiny_model_dir, tmp_path / "e", "--method", "rlaif"), capsys)
        assert "returned no logprobs" in err
    finally:
        bare.stop()
    chat_only = FakeServer(kind="chat-only")
    try:
        err = one_line_error(cli(chat_only.url, chat_only.model, tiny_model_dir, tmp_path / "f"), capsys)
        assert "has no completions API" in err and "--server-api chat" in err
    finally:
        chat_only.stop()


def test_the_key_never_reaches_a_record_and_the_url_loses_its_credentials(server, tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    url = server.url.replace("http://", "http://user:pa55@") + "?api-version=1&key=sk-secret-123"
    assert public_url(url) == server.url
    out = tmp_path / "out"
    assert main(cli(url, server.model, tiny_model_dir, out)) == 0
    printed = capsys.readouterr()
    for path in [p for p in out.rglob("*") if p.is_file()]:
        text = path.read_bytes().decode(errors="replace")
        assert "sk-secret-123" not in text and "pa55" not in text, path
    assert "sk-secret-123" not in printed.out + printed.err and "pa55" not in printed.out + printed.err
    assert f"base_url: {server.url}\n" in (out / "rlcd_build.yaml").read_text()


def test_a_server_that_goes_down_ends_the_build_in_one_line_and_resume_finishes_it(tiny_model_dir, tmp_path, capsys):
    clean = FakeServer()
    try:
        build(config(clean, tiny_model_dir, tmp_path / "clean", limit=12, batch_size=2), progress=False)
    finally:
        clean.stop()
    fake = FakeServer()
    fake.down_after = 10
    out = tmp_path / "out"
    # two requests in flight, sent in pair order: the 10 answered before the server goes down are 5 whole pairs
    args = cli(fake.url, fake.model, tiny_model_dir, out, "--limit", "12", "--batch-size", "2",
               "--max-concurrency", "2")
    err = one_line_error(args, capsys)
    assert f"the server at {fake.url}" in err and "--resume" in err
    kept = [json.loads(line) for p in (out / ".rlcd-build").glob("part-*.jsonl") for line in p.read_text().splitlines()]
    assert len(kept) >= 4  # the pairs finished before it went down
    again = FakeServer()  # the deployment comes back elsewhere: the URL is not part of what the build makes
    try:
        resumed = cli(again.url, again.model, tiny_model_dir, out, "--limit", "12", "--batch-size", "2", "--resume",
                      "--max-concurrency", "2")
        assert main(resumed) == 0
    finally:
        again.stop()
    assert [key(r) for r in rows(out)] == [key(r) for r in rows(tmp_path / "clean")]
    assert len(again.completions) < 24  # only what was missing


def test_kill_9_of_the_client_loses_at_most_the_requests_in_flight(tiny_model_dir, tmp_path, capsys):
    fake = FakeServer(delay=0.05)
    out = tmp_path / "out"
    args = cli(fake.url, fake.model, tiny_model_dir, out, "--limit", "12", "--batch-size", "2",
               "--max-concurrency", "2")
    try:
        process = subprocess.Popen([sys.executable, "-m", "rlcd_data", *args], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list((out / ".rlcd-build").glob("part-*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        served = len(fake.completions)
        assert 0 < served < 24
        assert main([*args, "--resume"]) == 0
        capsys.readouterr()
    finally:
        fake.stop()
    assert len(rows(out)) == 12
    clean = FakeServer()
    try:
        build(config(clean, tiny_model_dir, tmp_path / "clean", limit=12, batch_size=2), progress=False)
    finally:
        clean.stop()
    assert [key(r) for r in rows(out)] == [key(r) for r in rows(tmp_path / "clean")]


def test_score_and_the_policy_judge_read_logprobs_from_the_server(server, tiny_model_dir, hh_dir, tmp_path, capsys):
    pairs = str(hh_dir / "harmless-base-validation.jsonl")
    assert main(["score", "--llm", server.model, "--base-url", server.url, "--tokenizer", str(tiny_model_dir),
                 "--pairs", pairs, "--limit", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["pairs"] == 4 and report["server"] == server.url and report["missing_labels"] == 0
    assert 1 <= report["mean_score_chosen"] <= 10 and report["mean_score_chosen"] != report["mean_score_rejected"]
    ratings = [b for b in server.completions if b["max_tokens"] == 1]
    from transformers import AutoTokenizer

    from rlcd_data.generate.rater import score_token_ids

    digits, zero = score_token_ids(AutoTokenizer.from_pretrained(tiny_model_dir))  # SmolLM2 writes 10 as 1, 0
    assert [b["logprob_token_ids"] for b in ratings] == [digits] * 8 + [[zero]] * 8
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about number {i}."}) + "\n" for i in range(3)))
    assert main(["eval", "policy", "--policy", str(tiny_model_dir), "--base", str(tiny_model_dir), "--judge",
                 server.model, "--judge-base-url", server.url, "--judge-tokenizer", str(tiny_model_dir), "--prompts",
                 str(prompts), "--limit", "3", "--max-new-tokens", "8", "--samples", str(tmp_path / "s.jsonl"),
                 "--json", "--backend", "transformers"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["judge"] == server.model and report["judge_server"] == server.url
    assert 0 <= report["judge_win_rate"] <= 1 and report["judge_missing_labels"] == 0
    assert len([b for b in server.completions if b["max_tokens"] == 1]) == 16 + 6  # both orders of 3 pairs


def test_ppo_rewarded_by_a_rater_on_a_server(server, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Direct RLAIF with the rater behind a server: two PPO updates, the ratings read from the server's
    log-probabilities, and the recorded URL without its credentials."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about number {i}."}) + "\n" for i in range(8)))
    out = tmp_path / "ppo"
    url = server.url.replace("http://", "http://user:pa55@")
    assert main(["train", "ppo", "--reward_llm", server.model, "--rater_base_url", url, "--rater_tokenizer",
                 str(tiny_model_dir), "--policy", str(tiny_model_dir), "--prompts", str(prompts), "--output_dir",
                 str(out), "--preset", "ppo-cpu", "--per_device_train_batch_size", "4",
                 "--gradient_accumulation_steps", "1", "--local_rollout_forward_batch_size", "4",
                 "--response_length", "12", "--steps", "2", "--learning_rate", "1e-3", "--disable_tqdm", "true",
                 "--prompt_format", "text"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["ppo_updates"] == 2 and metrics["reward"].startswith(f"LLM rater {server.model}")
    assert any(b.get("logprob_token_ids") for b in server.completions)  # the rewards came from the server
    for path in [p for p in out.rglob("*") if p.is_file() and p.suffix in (".md", ".json", ".yaml")]:
        assert "pa55" not in path.read_text() and "sk-secret-123" not in path.read_text(), path

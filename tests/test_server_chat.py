"""Builds, labels, ratings and the judge through a server's chat completions API (`--server-api chat`), as
with a hosted API: the chat format's messages are sent, no tokenizer is needed. Against the fake server on
127.0.0.1 (tests/fake_openai_server.py)."""

import json

import pytest
from fake_openai_server import FakeServer, reply
from test_server import one_line_error, rows

from rlcd_data import BuildConfig, build
from rlcd_data.cli import main
from rlcd_data.errors import RlcdError
from rlcd_data.tasks.catalog import load_task
from rlcd_data.tasks.conversation import prompt_messages
from rlcd_data.tasks.task import ANSWER_ALONE, RATING_ALONE


@pytest.fixture
def hosted():
    """A chat-only server that is not vLLM, and whose model name no tokenizer can be found for."""
    fake = FakeServer(model="hosted-model-xl", kind="chat-only")
    yield fake
    fake.stop()


def chat_config(fake, out, **kw) -> BuildConfig:
    kw.setdefault("limit", 5)
    return BuildConfig(task="harmless", output=str(out), base_url=fake.url, model=fake.model, server_api="chat", **kw)


def test_a_chat_api_build_sends_the_descriptor_and_the_turns_as_messages(hosted, tmp_path):
    result = build(chat_config(hosted, tmp_path / "out"), progress=False)
    assert result.stats.pairs == 5 and result.config.prompt_format == "chat"  # auto: chat messages
    assert len(hosted.completions) == 10 and len({b["seed"] for b in hosted.completions}) == 10
    task = load_task("harmless")
    data = rows(tmp_path / "out")
    for row in data:
        turns, opening = prompt_messages(row["prompt"])
        system = {side: task.templates["system"].render(descriptor=row[f"{side}_descriptor"])
                  for side in ("positive", "negative")}
        expected_plus = [{"role": "system", "content": system["positive"]}, *turns]
        expected_minus = [{"role": "system", "content": system["negative"]}, *turns]
        assert opening == "" and turns[-1]["role"] == "user"
        # what reached the server, and what the rows record, are the messages themselves
        assert json.loads(row["p_plus"]) == expected_plus and json.loads(row["p_minus"]) == expected_minus
        sent = [b for b in hosted.completions if b["messages"] in (expected_plus, expected_minus)]
        assert len(sent) == 2 and all(b["model"] == hosted.model and b["max_tokens"] == 300 for b in sent)
        assert all({"temperature", "top_p", "seed", "stop", "n"} <= set(b) for b in sent)
        assert not {"allowed_token_ids", "top_k", "add_special_tokens"} & {k for b in sent for k in b}
        plus = next(b for b in sent if b["messages"] == expected_plus)
        assert row["chosen"] == reply(json.dumps(expected_plus, ensure_ascii=False), plus["seed"])
        assert row["chosen_tokens"] == len(row["chosen"].split())  # the server's usage count (no tokenizer)
    saved = (tmp_path / "out" / "rlcd_build.yaml").read_text()
    assert "server_api: chat" in saved and "prompt_format: chat" in saved
    card = (tmp_path / "out" / "README.md").read_text()
    assert "chat format's messages above" in card and "(openai-compatible server, chat completions API)" in card


def test_chat_api_labels_read_the_first_tokens_top_logprobs_by_text(tmp_path):
    fake = FakeServer(model="hosted-model-xl", kind="chat-only", option_tokens={"A": 0, " B": 0, "Sure": 0})
    try:
        result = build(chat_config(fake, tmp_path / "out", method="rlaif", label_both_orders=True, limit=3),
                       progress=False)
    finally:
        fake.stop()
    labels = [b for b in fake.completions if b["max_tokens"] == 1]
    assert len(labels) == 1 + 2 * 3  # the probe, then both orders of each pair
    for body in labels:
        assert body["logprobs"] is True and body["top_logprobs"] == 20 and len(body["messages"]) == 1
        assert body["messages"][0]["role"] == "user" and "The answer is" not in body["messages"][0]["content"]
    assert all(b["messages"][0]["content"].endswith(ANSWER_ALONE) for b in labels[1:])
    # " B" is B with its space stripped: every label found both letters
    assert result.stats.labels_missing_tokens == 0
    probabilities = [r["chosen_probability"] for r in rows(tmp_path / "out")]
    assert len(probabilities) == 3 and all(0.5 <= p <= 1 for p in probabilities) and len(set(probabilities)) > 1


def test_a_label_letter_missing_from_the_chat_top_logprobs_is_counted(tmp_path):
    fake = FakeServer(model="hosted-model-xl", kind="chat-only", option_tokens={"A": 0, "Sure": 0})
    try:
        result = build(chat_config(fake, tmp_path / "out", method="rlaif", limit=3), progress=False)
    finally:
        fake.stop()
    assert result.stats.labels_missing_tokens == 3 and result.stats.pairs == 3


def test_score_and_the_policy_judge_through_a_chat_api(tiny_model_dir, hh_dir, tmp_path, capsys):
    scores = {str(s): 0 for s in (7, 1, 2, 3, 4, 5, 6, 8, 9, 10)}  # every score among the top 20; 10 one token
    fake = FakeServer(model="hosted-model-xl", kind="chat-only", option_tokens=scores)
    try:
        assert main(["score", "--llm", fake.model, "--base-url", fake.url, "--server-api", "chat", "--pairs",
                     str(hh_dir / "harmless-base-validation.jsonl"), "--limit", "3", "--json"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["pairs"] == 3 and report["server_api"] == "chat" and report["missing_labels"] == 0
        assert 1 <= report["mean_score_chosen"] <= 10 and report["mean_score_chosen"] != report["mean_score_rejected"]
        ratings = [b for b in fake.completions if b["max_tokens"] == 1]
        assert len(ratings) == 6 and all(b["messages"][0]["content"].endswith(RATING_ALONE) for b in ratings)
    finally:
        fake.stop()
    judge = FakeServer(model="hosted-judge", kind="chat-only")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about number {i}."}) + "\n" for i in range(3)))
    try:
        assert main(["eval", "policy", "--policy", str(tiny_model_dir), "--base", str(tiny_model_dir), "--judge",
                     judge.model, "--judge-base-url", judge.url, "--judge-server-api", "chat", "--prompts",
                     str(prompts), "--limit", "3", "--max-new-tokens", "8", "--samples", str(tmp_path / "s.jsonl"),
                     "--json", "--backend", "transformers"]) == 0
    finally:
        judge.stop()
    report = json.loads(capsys.readouterr().out)
    assert report["judge_server_api"] == "chat" and report["judge_missing_labels"] == 0
    assert 0 <= report["judge_win_rate"] <= 1
    asked = [b for b in judge.completions if b["max_tokens"] == 1]
    assert len(asked) == 6 and all(b["messages"][0]["content"].endswith(ANSWER_ALONE) for b in asked)


def test_chat_api_misuse_is_a_one_line_error(hosted, tiny_model_dir, tmp_path, capsys):
    def args(out, *more):
        return ["build", "harmless", "--limit", "2", "--output", str(tmp_path / out), "--base-url", hosted.url,
                "--model", hosted.model, "--server-api", "chat", *more]

    err = one_line_error(args("a", "--prompt-format", "text"), capsys)
    assert "--prompt-format text needs the completions API" in err
    err = one_line_error(args("b", "--method", "rlaif", "--label-cot"), capsys)
    assert "--label-cot" in err and "--server-api completions" in err
    err = one_line_error(["build", "harmless", "--limit", "2", "--output", str(tmp_path / "c"), "--model",
                          str(tiny_model_dir), "--server-api", "chat"], capsys)
    assert "--server-api chat applies to a model server" in err
    # the outline task's prompts open the assistant's reply ("Here is a possible outline:")
    err = one_line_error(["build", "outline", "--limit", "2", "--output", str(tmp_path / "d"), "--base-url",
                          hosted.url, "--model", hosted.model, "--server-api", "chat"], capsys)
    assert "prompts.jsonl: prompt 0 (0-based)" in err and "'Here is a possible outline:" in err
    assert "chat completions API cannot continue" in err
    assert not hosted.completions  # refused before any request
    completions_only = FakeServer(kind="completions-only")
    try:
        err = one_line_error(["build", "harmless", "--limit", "2", "--output", str(tmp_path / "e"), "--base-url",
                              completions_only.url, "--model", completions_only.model, "--server-api", "chat"],
                             capsys)
    finally:
        completions_only.stop()
    assert "has no chat completions API" in err and "--server-api completions" in err
    assert not (tmp_path / "e" / "data").exists()
    with pytest.raises(RlcdError, match="needs its tokenizer at hand for the completions API"):
        build(BuildConfig(task="harmless", output=str(tmp_path / "f"), base_url=hosted.url, model=hosted.model,
                          prompt_format="text", limit=2), progress=False)


def test_ppo_rewards_from_a_rater_on_a_chat_api():
    """`train ppo --reward_llm M --rater_base_url URL --rater_server_api chat`: the reward of each response is
    the rater's expected score, asked as a user message through the chat completions API."""
    from rlcd_data.train.online import open_reward
    from rlcd_data.train.ppo import PPOScriptArguments

    fake = FakeServer(model="hosted-rater", kind="chat-only", option_tokens={str(s): 0 for s in range(1, 11)})
    try:
        script = PPOScriptArguments(reward_llm=fake.model, rater_base_url=fake.url, rater_server_api="chat")
        rewards = open_reward(script, "ppo").score_responses(["\n\nHuman: Hi there\n\nAssistant:"] * 2,
                                                             ["Hello!", "Go away."])
    finally:
        fake.stop()
    assert len(rewards) == 2 and all(-1 <= r <= 1 for r in rewards) and rewards[0] != rewards[1]
    assert len(fake.completions) == 2 and all(b["messages"][0]["content"].endswith(RATING_ALONE)
                                              for b in fake.completions)

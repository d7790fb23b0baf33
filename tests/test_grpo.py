"""`rlcd-data train grpo`: GRPO (TRL's GRPOTrainer) from a reward model or an LLM rater, on the tiny models."""

from __future__ import annotations

import json

import pytest
from test_train import tiny_reward_model  # noqa: F401 (a fixture)

from rlcd_data.cli import main
from rlcd_data.train.grpo import rlcd_reward


def prompts_file(path, n=8):
    path.write_text("".join(json.dumps({"prompt": f"Tell me about number {i}."}) + "\n" for i in range(n)))
    return path


def grpo_args(policy, prompts, out, *extra):
    return ["train", "grpo", "--policy", str(policy), "--prompts", str(prompts), "--output_dir", str(out),
            "--preset", "none", "--per_device_train_batch_size", "4", "--num_generations", "2",
            "--max_completion_length", "12", "--steps", "2", "--learning_rate", "1e-3", "--beta", "0.04",
            "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", *extra]


class Scorer:
    """Scores a response by its length, and records what it was asked."""

    def __init__(self):
        self.asked = []

    def score_responses(self, conversations, responses):
        self.asked.append((conversations, responses))
        return [float(len(r)) for r in responses]


def test_the_reward_cuts_at_the_next_human_turn_and_penalises_what_did_not_end():
    scorer = Scorer()
    reward = rlcd_reward(scorer, eos_ids={2}, penalty=-1.0)
    conversation = "\n\nHuman: Hi?\n\nAssistant:"
    completions = [" Hello there.", " Hi.\n\nHuman: and more", " cut off at the lim", ""]
    ids = [[5, 6, 2], [5, 6, 7, 8, 9], [5, 6, 7], [2]]  # ends at EOS, at a Human turn, at the limit, empty
    rewards = reward(prompts=["p"] * 4, completions=completions, completion_ids=ids,
                     conversation=[conversation] * 4)
    assert scorer.asked == [([conversation] * 2, ["Hello there.", "Hi."])]  # as the paper cuts them
    assert rewards == [float(len("Hello there.")), float(len("Hi.")), -1.0, -1.0]
    assert reward.tokens == 12


def test_grpo_trains_from_a_reward_model_and_the_policy_evaluates(tiny_reward_model,  # noqa: F811
                                                                    tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    prompts = prompts_file(tmp_path / "prompts.jsonl")
    out = tmp_path / "grpo"
    assert main(grpo_args(tiny_model_dir, prompts, out, "--reward_model", str(tiny_reward_model))) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads(line)
    assert metrics["grpo_updates"] == 2 and metrics["num_generations"] == 2 and metrics["prompts"] == 8
    assert 0 < metrics["generated_tokens"] <= 2 * 4 * 12 and metrics["seconds_per_1000_generated_tokens"] > 0
    assert metrics["reward"] == f"reward model {tiny_reward_model}"
    name = "model.layers.1.mlp.down_proj.weight"
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert not (before[name] == after[name]).all()
    record = json.loads((out / "rlcd_recipe.json").read_text())
    assert record["recipe"] == "grpo" and record["settings"]["prompt_format"] == "chat"  # SmolLM2's template
    assert record["settings"]["reward_model"] == str(tiny_reward_model) and record["settings"]["beta"] == 0.04
    assert "rlcd-data train grpo" in (out / "README.md").read_text()

    assert main(["eval", "policy", "--policy", str(out), "--reward-model", str(tiny_reward_model), "--prompts",
                 str(prompts), "--limit", "4", "--max-new-tokens", "8", "--json", "--backend", "transformers"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 4 and report["base"] == str(tiny_model_dir) and report["prompt_format"] == "chat"
    assert len((out / "eval-samples.jsonl").read_text().splitlines()) == 4


def test_grpo_with_an_llm_rater_as_the_reward(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "grpo-rater"
    assert main(grpo_args(tiny_model_dir, prompts_file(tmp_path / "p.jsonl", 4), out, "--reward_llm",
                          str(tiny_model_dir), "--steps", "1")) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["grpo_updates"] == 1 and metrics["reward"].startswith(f"LLM rater {tiny_model_dir}")
    assert (out / "model.safetensors").is_file()


def test_misuse_is_one_line(tiny_reward_model, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    prompts = prompts_file(tmp_path / "p.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rm = ["--reward_model", str(tiny_reward_model)]
    cases = [
        ([], "train grpo: give --reward_model or --reward_llm (one of them)"),
        ([*rm, "--reward_llm", str(tiny_model_dir)], "train grpo: give --reward_model or --reward_llm (one of them)"),
        (["--reward_model", str(tiny_model_dir)], "a reward model has one output, this one has 2"),
        ([*rm, "--num_generations", "3"], "num_generations"),
    ]
    for extra, message in cases:
        assert main(grpo_args(tiny_model_dir, prompts, tmp_path / "out", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert main(grpo_args(tiny_model_dir, empty, tmp_path / "out", *rm)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty.jsonl" in err, err


@pytest.mark.parametrize("preset", ["grpo-cpu"])
def test_the_cpu_preset_parses_to_a_batch_its_generations_divide(preset):
    from rlcd_data.train import common
    from rlcd_data.train.grpo import make_parser

    (_, config, _), used = common.parse(make_parser(), ["--preset", preset, "--policy", "p", "--prompts", "q"])
    assert used == preset and config.use_cpu and not config.bf16
    assert config.generation_batch_size % config.num_generations == 0 and config.max_completion_length == 64


def test_a_lora_adapter_on_an_8bit_policy_trains_on_cpu(tiny_reward_model, tiny_model_dir, tmp_path,  # noqa: F811
                                                        capsys):
    """--use_peft --load_in_8bit, as the other recipes take them: the adapter folder is saved and recorded."""
    out = tmp_path / "grpo-8bit"
    assert main(grpo_args(tiny_model_dir, prompts_file(tmp_path / "p.jsonl", 4), out, "--reward_model",
                          str(tiny_reward_model), "--steps", "1", "--use_peft", "--load_in_8bit")) == 0
    assert json.loads(capsys.readouterr().out)["grpo_updates"] == 1
    assert (out / "adapter_config.json").is_file() and "load_in_8bit: true" in (out / "README.md").read_text()

"""Training recipes (reward, PPO, SFT) and evaluation, with the tiny random Llama and the embedded encoder."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from rlcd_data.cli import main

GOOD, BAD = "yes indeed, gladly", "no never, go away"


def toy_pairs(path, n=32, soft=False):
    """A separable pair dataset: the chosen response always says GOOD, the rejected one BAD."""
    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "chosen": f" {i}: {GOOD}", "rejected": f" {i}: {BAD}"}
            if soft:
                row["chosen_probability"] = 0.75
            f.write(json.dumps(row) + "\n")
    return path


def reward_args(dataset, model, out, *extra):
    return [
        "train", "reward", "--dataset", str(dataset), "--model", str(model), "--output_dir", str(out),
        "--preset", "none", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8",
        "--num_train_epochs", "4", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
        *extra,
    ]


def record_trained_layers(monkeypatch, trainer_cls) -> set[str]:
    """The class names of the modules ``trainer_cls`` trains, filled in when its ``train`` runs."""
    layers: set[str] = set()
    original_train = trainer_cls.train

    def train_and_record_layers(self, *args, **kwargs):
        layers.update(type(m).__name__ for m in self.model.modules())
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(trainer_cls, "train", train_and_record_layers)
    return layers


def ppo_args(reward_model, policy, prompts, out, batch, response_length, learning_rate, *extra):
    return [
        "train", "ppo", "--reward_model", str(reward_model), "--policy", str(policy), "--prompts", str(prompts),
        "--output_dir", str(out), "--preset", "ppo-cpu", "--per_device_train_batch_size", str(batch),
        "--gradient_accumulation_steps", "1", "--local_rollout_forward_batch_size", str(batch), "--response_length", str(response_length), "--steps", "2",
        "--learning_rate", str(learning_rate), "--disable_tqdm", "true", *extra,
    ]


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_model_dir):
    """A reward model trained from the tiny Llama on the separable toy pairs (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("rm")
    out = tmp / "rm"
    assert main(reward_args(toy_pairs(tmp / "pairs.jsonl"), tiny_model_dir, out)) == 0
    return out


def test_reward_training_learns_a_separable_dataset(tiny_reward_model, tiny_model_dir, tmp_path):
    from rlcd_data.train.evaluate import evaluate_reward_model
    from rlcd_data.train.reward_model import RewardModel

    recipe = json.loads((tiny_reward_model / "rlcd_recipe.json").read_text())
    assert recipe["metrics"]["label_type"] == "hard (pairwise)" and recipe["metrics"]["steps"] == 16
    held_out = toy_pairs(tmp_path / "held.jsonl", n=8)
    trained = evaluate_reward_model(RewardModel.load(tiny_reward_model), str(held_out))
    untrained = _untrained_reward_model(tiny_model_dir)
    before = evaluate_reward_model(untrained, str(held_out))
    assert trained["accuracy"] == 1.0 and trained["mean_chosen_probability"] > 0.9
    assert before["mean_chosen_probability"] < trained["mean_chosen_probability"]
    assert recipe["metrics"]["train_loss"] < math.log(2)  # below the pairwise loss of a model that cannot tell
    card = (tiny_reward_model / "README.md").read_text()
    assert "rlcd-data train reward" in card and "pairs.jsonl" in card and "train_loss" in card


def _untrained_reward_model(path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlcd_data.train.reward_model import RewardModel

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    return RewardModel(model, AutoTokenizer.from_pretrained(path))


def test_under_disable_tqdm_stdout_holds_only_the_metrics_line(tiny_model_dir, tmp_path, capsys):
    """transformers' log dicts (its PrinterCallback) go to stderr: stdout is the one JSON line a caller reads."""
    out = tmp_path / "rm"
    assert main(reward_args(toy_pairs(tmp_path / "pairs.jsonl", n=8), tiny_model_dir, out, "--num_train_epochs",
                            "1")) == 0
    captured = capsys.readouterr()
    (line,) = captured.out.strip().splitlines()
    assert json.loads(line)["steps"] == 1
    assert "'loss':" in captured.err


def test_reward_loss_falls_and_parameters_change(tiny_reward_model, tiny_model_dir):
    from safetensors.torch import load_file

    history = json.loads((tiny_reward_model / "rlcd_recipe.json").read_text())
    assert history["metrics"]["train_loss"] < math.log(2)  # below chance: the loss fell from ~0.69
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(tiny_reward_model / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not (before[name] == after[name]).all()


def test_soft_label_loss_equals_hand_computation(tiny_model_dir, tmp_path):
    """The trainer's loss on a fixed batch is -(p log s(d) + (1-p) log s(-d)), d = r_chosen - r_rejected."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig

    from rlcd_data.train.reward import soft_label_classes

    trainer_cls, collator_cls = soft_label_classes()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    from datasets import Dataset

    data = Dataset.from_list(
        [{"chosen": "a b c", "rejected": "d e", "chosen_probability": 0.8},
         {"chosen": "f g", "rejected": "h i j k", "chosen_probability": 0.3}]
    )
    args = RewardConfig(str(tmp_path / "o"), use_cpu=True, bf16=False, report_to="none", disable_dropout=True)
    trainer = trainer_cls(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                          data_collator=collator_cls(pad_token_id=tokenizer.pad_token_id))
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(2)])
    assert batch["chosen_probability"].tolist() == pytest.approx([0.8, 0.3])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].tolist()
    d = [rewards[0] - rewards[2], rewards[1] - rewards[3]]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -sum(p * math.log(sig(x)) + (1 - p) * math.log(sig(-x)) for p, x in zip([0.8, 0.3], d)) / 2
    assert loss == pytest.approx(expected, rel=1e-5)
    # and with a hard label (p = 1) it is TRL's pairwise loss
    hard = dict(batch, chosen_probability=torch.ones(2))
    with torch.no_grad():
        hard_loss = trainer.compute_loss(model, hard).item()
    assert hard_loss == pytest.approx(-sum(math.log(sig(x)) for x in d) / 2, rel=1e-5)


def test_soft_labels_train_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "rm-soft"
    args = reward_args(toy_pairs(tmp_path / "soft.jsonl", n=16, soft=True), tiny_model_dir, out, "--num_train_epochs", "1")
    assert main(args) == 0
    recipe = json.loads((out / "rlcd_recipe.json").read_text())
    assert recipe["metrics"]["label_type"].startswith("soft")
    # p = 0.75 everywhere: the loss cannot go below the entropy of 0.75
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert recipe["metrics"]["train_loss"] > entropy - 1e-3


def test_encoder_reward_model_minilm(tmp_path):
    """An encoder base (MiniLM-L6, no EOS token) trains and scores with [SEP] as the end token."""
    from rlcd_data.train.reward_model import RewardModel

    out = tmp_path / "rm-minilm"
    args = reward_args(toy_pairs(tmp_path / "p.jsonl", n=16), "minilm-l6", out, "--num_train_epochs", "1",
                       "--learning_rate", "5e-5")
    assert main(args) == 0
    reward_model = RewardModel.load(out)
    assert reward_model.end == "[SEP]"
    assert len(reward_model.score(["\n\nHuman: hi\n\nAssistant: hello", "x"])) == 2


def test_eval_reward_model_cli_matches_hand_computation(tiny_reward_model, tmp_path, capsys):
    from rlcd_data.train.evaluate import agreement
    from rlcd_data.train.reward_model import RewardModel

    pairs = tmp_path / "hh.jsonl"  # HH-RLHF layout: implicit prompt
    with open(pairs, "w") as f:
        for i in range(5):
            f.write(json.dumps({"chosen": f"\n\nHuman: q{i}\n\nAssistant: {GOOD}",
                                "rejected": f"\n\nHuman: q{i}\n\nAssistant: {i} {BAD}"}) + "\n")
    assert main(["eval", "reward-model", "--reward-model", str(tiny_reward_model), "--pairs", str(pairs), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    reward_model = RewardModel.load(tiny_reward_model)
    chosen, rejected = reward_model.score([r["chosen"] for r in rows]), reward_model.score([r["rejected"] for r in rows])
    assert report == pytest.approx(agreement(chosen, rejected))
    assert report["pairs"] == 5 and set(report) >= {"accuracy", "mean_chosen_probability", "pairs"}
    assert main(["eval", "reward-model", "--reward-model", str(tiny_reward_model), "--pairs", str(pairs)]) == 0
    assert "agreement" in capsys.readouterr().out
    # the numbers go into the model's card and record
    card = (tiny_reward_model / "README.md").read_text()
    assert f"eval_hh_accuracy: {report['accuracy']:.4f}" in card
    assert "rlcd-data train reward" in card


def test_agreement_and_win_rate_on_fixed_scores():
    from rlcd_data.train.evaluate import agreement, policy_comparison

    report = agreement([2.0, 0.0, 1.0, -1.0], [1.0, 0.0, 3.0, -2.0])
    assert report["accuracy"] == 0.5  # 2 > 1, 0 = 0 (a tie is no agreement), 1 < 3, -1 > -2
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert report["mean_chosen_probability"] == pytest.approx((s(1) + s(0) + s(-2) + s(1)) / 4)
    comparison = policy_comparison([1.0, 2.0, 0.0], [0.5, 2.0, 1.0])
    assert comparison["policy_win_rate"] == pytest.approx(1.5 / 3)
    assert comparison["policy_mean_reward"] == pytest.approx(1.0) and comparison["base_mean_reward"] == pytest.approx(3.5 / 3)


def test_ppo_runs_updates_and_eval_policy(tiny_reward_model, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about number {i}."}) + "\n" for i in range(8)))
    out = tmp_path / "ppo"
    assert main(ppo_args(tiny_reward_model, tiny_model_dir, prompts, out, 4, 12, "1e-3")) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["ppo_updates"] == 2 and metrics["rollout_batch"] == 4
    assert metrics["value_initialised_from"] == "reward model"  # same architecture and vocabulary
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert not (before[name] == after[name]).all()
    assert "rlcd-data train ppo" in (out / "README.md").read_text()
    # The tiny policy has SmolLM2's chat template: rollouts saw prompts through it, and the record says so.
    assert json.loads((out / "rlcd_recipe.json").read_text())["settings"]["prompt_format"] == "chat"

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "policy", "--policy", str(out), "--reward-model", str(tiny_reward_model),
                 "--prompts", str(prompts), "--limit", "4", "--max-new-tokens", "8",
                 "--json", "--backend", "transformers"]) == 0
    report = json.loads(capsys.readouterr().out)
    samples = out / "eval-samples.jsonl"  # without --samples: in the policy's folder, not where the command ran
    assert not any(elsewhere.iterdir())
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert report["prompts"] == len(rows) == 4 and report["base"] == str(tiny_model_dir)
    assert report["prompt_format"] == "chat"  # the policy's recorded format, for both sides
    assert report["policy_mean_reward"] == pytest.approx(sum(r["policy_reward"] for r in rows) / 4)
    wins = sum(1.0 if r["policy_reward"] > r["base_reward"] else 0.5 if r["policy_reward"] == r["base_reward"] else 0
               for r in rows)
    assert report["policy_win_rate"] == pytest.approx(wins / 4)
    assert f"eval_policy_prompts_policy_win_rate: {report['policy_win_rate']:.4f}" in (out / "README.md").read_text()


def test_ppo_grid_runs_each_kl_with_checkpoints(tiny_reward_model, tiny_model_dir, tmp_path, capsys):
    """--grid: one run per KL coefficient into OUTPUT_DIR/kl-<coef>, a checkpoint every --save_steps updates."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(4)))
    out = tmp_path / "grid"
    assert main(ppo_args(tiny_reward_model, tiny_model_dir, prompts, out, 2, 8, "1e-2", "--grid", "--kl_grid",
                         "0.001,0.032", "--save_strategy", "steps", "--save_steps", "1", "--prompt_format", "text")) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [r["kl_coef"] for r in runs] == [0.001, 0.032] and all(r["ppo_updates"] == 2 for r in runs)
    for kl in ("0.001", "0.032"):
        run = out / f"kl-{kl}"
        assert (run / "model.safetensors").exists() and f"kl_coef: {kl}" in (run / "README.md").read_text()
        assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
        assert json.loads((run / "rlcd_recipe.json").read_text())["settings"]["prompt_format"] == "text"
    name = "model.layers.1.mlp.down_proj.weight"
    low, high = (load_file(out / f"kl-{kl}" / "model.safetensors")[name] for kl in ("0.001", "0.032"))
    assert not (low == high).all()  # the KL penalty changed the updates


def test_text_reward_cuts_at_human_turn_and_penalises(tiny_reward_model, tiny_model_dir):
    """The PPO reward reads decoded text: cut at the next Human turn; an unfinished response gets the penalty."""
    import torch
    from transformers import AutoTokenizer

    from rlcd_data.train.ppo_reward import reward_adapter_class
    from rlcd_data.train.reward_model import RewardModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reward_model = RewardModel.load(tiny_reward_model)
    prompt = "\n\nHuman: hi?\n\nAssistant:"
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    reward = reward_adapter_class()(reward_model, tok, {tuple(prompt_ids): prompt}, penalty=-7.0)
    finished = prompt_ids + tok(f" {GOOD}\n\nHuman: more", add_special_tokens=False)["input_ids"]
    unfinished = prompt_ids + tok(f" {GOOD} and so", add_special_tokens=False)["input_ids"]
    width = max(len(finished), len(unfinished)) + 1  # every row ends in padding except where noted
    pad = tok.pad_token_id
    rows = [finished + [pad] * (width - len(finished)), unfinished + [7] * (width - len(unfinished))]
    ids = torch.tensor(rows)
    mask = torch.tensor([[1] * len(finished) + [0] * (width - len(finished)), [1] * width])
    out = reward.score(getattr(reward, reward.base_model_prefix)(input_ids=ids, attention_mask=mask).hidden_states[-1])
    expected = reward_model.score([prompt + f" {GOOD}"])[0]
    assert out[0, -1, 0].item() == pytest.approx(expected, rel=1e-5)
    assert out[1, -1, 0].item() == -7.0


def test_text_reward_counts_every_end_of_sequence_token_of_the_policy(tiny_reward_model, tiny_model_dir):
    """A rollout that fills the response budget and ends with an end-of-sequence id the policy's
    generation_config lists beside its tokenizer's (as Llama 3 lists <|eot_id|>) ended: it is scored."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from rlcd_data.train.ppo_reward import reward_adapter_class
    from rlcd_data.train.reward_model import RewardModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reward_model = RewardModel.load(tiny_reward_model)
    prompt = "\n\nHuman: hi?\n\nAssistant:"
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    second = 0  # <|endoftext|>, special, not the tokenizer's end-of-sequence
    assert second in tok.all_special_ids and second != tok.eos_token_id
    rows = [prompt_ids + tok(f" {GOOD}", add_special_tokens=False)["input_ids"] + [end]
            for end in (second, tok.eos_token_id)]
    ids, mask = torch.tensor(rows), torch.ones(len(rows), len(rows[0]), dtype=torch.long)  # no padding: the budget

    def scores(generation_config):
        reward = reward_adapter_class()(reward_model, tok, {tuple(prompt_ids): prompt}, -7.0, generation_config)
        out = getattr(reward, reward.base_model_prefix)(input_ids=ids, attention_mask=mask).hidden_states[-1]
        return out[:, -1, 0].tolist()

    expected = reward_model.score([prompt + f" {GOOD}"])[0]
    assert scores(GenerationConfig(eos_token_id=[tok.eos_token_id, second])) == pytest.approx([expected] * 2, rel=1e-5)
    assert scores(GenerationConfig(eos_token_id=tok.eos_token_id)) == pytest.approx([-7.0, expected], rel=1e-5)


def test_ppo_with_an_llm_rater_as_the_reward(tiny_model_dir, tmp_path, capsys):
    """Direct RLAIF: two PPO updates rewarded by the tiny model's 1-10 ratings change the policy, and the
    card names the reward."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about number {i}."}) + "\n" for i in range(8)))
    out = tmp_path / "ppo-llm"
    args = ppo_args("unused", tiny_model_dir, prompts, out, 4, 12, "1e-3", "--prompt_format", "text")
    args[args.index("--reward_model") : args.index("--reward_model") + 2] = ["--reward_llm", str(tiny_model_dir)]
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["ppo_updates"] == 2 and metrics["reward"].startswith(f"LLM rater {tiny_model_dir}")
    name = "model.layers.1.mlp.down_proj.weight"
    assert not (load_file(tiny_model_dir / "model.safetensors")[name] == load_file(out / "model.safetensors")[name]).all()
    card = (out / "README.md").read_text()
    assert f"reward_llm: {tiny_model_dir}" in card and "LLM rater" in card
    assert main(ppo_args(tiny_model_dir, tiny_model_dir, prompts, out, 4, 12, "1e-3", "--reward_llm", "x")) == 2
    assert "give --reward_model or --reward_llm" in capsys.readouterr().err


def test_llm_reward_is_the_raters_expected_score_of_the_cut_response(tiny_model_dir):
    import torch
    from transformers import AutoTokenizer

    from rlcd_data.generate.rater import LLMRewards, open_rater
    from rlcd_data.tasks.catalog import load_task
    from rlcd_data.train.ppo_reward import reward_adapter_class

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rater, chat = open_rater(str(tiny_model_dir))
    task = load_task("harmless")
    prompt = "\n\nHuman: hi?\n\nAssistant:"
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    reward = reward_adapter_class()(LLMRewards(rater, task, chat), tok, {tuple(prompt_ids): prompt}, penalty=-3.0)
    finished = prompt_ids + tok(f" {GOOD}\n\nHuman: more", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([finished + [tok.pad_token_id]])  # ends in padding: the response ended
    mask = torch.tensor([[1] * len(finished) + [0]])
    out = reward.score(getattr(reward, reward.base_model_prefix)(input_ids=ids, attention_mask=mask).hidden_states[-1])
    expected = rater.rewards([task.render_rating(prompt, f" {GOOD}")])[0]
    assert out[0, -1, 0].item() == pytest.approx(expected, rel=1e-5) and -1 <= expected <= 1


class PositionBiasedJudge:
    """Prefers whatever is shown as A by ``bias``, plus ``lean`` towards responses containing "POLICY"."""

    def __init__(self, bias: float, lean: float):
        self.bias, self.lean = bias, lean

    def first_option_probability(self, prompts):
        return [0.5 + self.bias + (self.lean if "(A) POLICY" in p else -self.lean) for p in prompts]


@pytest.mark.parametrize("lean, wins, ties", [(0.0, 0.5, 1.0), (0.1, 0.5, 1.0), (0.35, 1.0, 0.0), (-0.35, 0.0, 0.0)])
def test_judging_both_orders_cancels_position_bias(lean, wins, ties):
    from rlcd_data.tasks.catalog import load_task
    from rlcd_data.train.evaluate import judge_comparison

    prompts = ["\n\nHuman: hi?\n\nAssistant:"] * 3
    report, better = judge_comparison(PositionBiasedJudge(0.3, lean), load_task("harmless"), prompts,
                                      ["POLICY answer"] * 3, ["BASE answer"] * 3)
    # a judge that always says A (bias 0.3) with a weaker lean only ties; a lean beyond the bias decides
    assert report["judge_win_rate"] == pytest.approx(wins) and report["judge_ties"] == pytest.approx(ties)
    assert better == pytest.approx([0.5 + lean] * 3)
    assert report["judge_win_rate_ci95_low"] <= report["judge_win_rate"] <= report["judge_win_rate_ci95_high"]


def test_eval_policy_with_an_llm_judge_end_to_end(tiny_model_dir, tmp_path, capsys):
    """Policy = base with the same seeds: identical responses, which a judge can only tie once both orders count."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about number {i}."}) + "\n" for i in range(4)))
    samples = tmp_path / "samples.jsonl"
    assert main(["eval", "policy", "--policy", str(tiny_model_dir), "--base", str(tiny_model_dir), "--judge",
                 str(tiny_model_dir), "--prompts", str(prompts), "--limit", "4", "--max-new-tokens", "8",
                 "--samples", str(samples), "--json", "--backend", "transformers"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert report["prompts"] == 4 and report["judge"] == str(tiny_model_dir) and "policy_mean_reward" not in report
    assert all(r["policy"] == r["base"] for r in rows)
    assert report["judge_win_rate"] == 0.5 and report["judge_ties"] == 1.0
    assert all(r["judge_policy_probability"] == pytest.approx(0.5) for r in rows)
    assert main(["eval", "policy", "--policy", str(tiny_model_dir), "--base", str(tiny_model_dir),
                 "--prompts", str(prompts)]) == 2
    assert "give --reward-model, --judge, or both" in capsys.readouterr().err


def test_sft_on_pairs_uses_chosen(tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    args = ["train", "sft", "--dataset", str(toy_pairs(tmp_path / "p.jsonl", n=8)), "--model", str(tiny_model_dir),
            "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--save_strategy", "no", "--disable_tqdm", "true"]
    assert main(args) == 0
    recipe = json.loads((out / "rlcd_recipe.json").read_text())
    assert recipe["metrics"]["steps"] == 3 and recipe["metrics"]["examples"] == 8
    from rlcd_data.sources.pairs import load_table
    from rlcd_data.train.sft import prompt_completion

    converted = prompt_completion(load_table(tmp_path / "p.jsonl"))
    assert converted[0] == {"prompt": "\n\nHuman: question 0?\n\nAssistant:", "completion": f" 0: {GOOD}"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "reward", "--model", "x"], "--dataset is required"),
        (["train", "reward", "--dataset", "missing.jsonl", "--model", "x"], "no such file"),
        (["train", "reward", "--preset", "nope", "--dataset", "d"], "unknown preset 'nope'"),
        (["train", "ppo", "--policy", "p", "--prompts", "q"], "give --reward_model or --reward_llm"),
        (["train", "reward", "--dataset", "d", "--learnin_rate", "1"], "not used by the HfArgumentParser: ['--learnin_rate'"),
        (["train", "sft", "--dataset", "d", "--config", "nope.yaml"], "nope.yaml: no such config file"),
        (["eval", "reward-model", "--reward-model", "nowhere/at/all", "--pairs", "p.jsonl"], "no such model folder"),
    ],
)
def test_training_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_not_a_pair_dataset(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    assert main(["train", "reward", "--dataset", str(bad), "--model", "x"]) == 2
    assert "not a pair dataset: no 'chosen' or 'rejected' column (columns: text)" in capsys.readouterr().err


def test_lora_reward_model_is_saved_merged(tiny_model_dir, tmp_path):
    """--use_peft trains LoRA adapters (and the score head) and saves a plain, merged reward model."""
    from rlcd_data.train.reward_model import RewardModel

    out = tmp_path / "rm-lora"
    args = reward_args(toy_pairs(tmp_path / "p.jsonl", n=16), tiny_model_dir, out, "--num_train_epochs", "1",
                       "--use_peft", "--lora_r", "4", "--lora_alpha", "8")
    assert main(args) == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    assert len(RewardModel.load(out).score(["a", "b c"])) == 2
    assert "use_peft: true" in (out / "README.md").read_text()


@pytest.mark.parametrize("bits, layer", [("8", "Linear8bitLt"), ("4", "Linear4bit")])
def test_quantized_lora_reward_model_trains_on_cpu_and_loads(tiny_model_dir, tmp_path, monkeypatch, bits, layer):
    """--load_in_8bit/--load_in_4bit --use_peft: bitsandbytes base on the CPU; the adapter folder loads back for scoring."""
    import torch
    from safetensors.torch import load_file

    from rlcd_data.train.reward import soft_label_classes
    from rlcd_data.train.reward_model import RewardModel

    trained_layers = record_trained_layers(monkeypatch, soft_label_classes()[0])
    out = tmp_path / f"rm-{bits}bit"
    args = reward_args(toy_pairs(tmp_path / "p.jsonl", n=8), tiny_model_dir, out, "--max_steps", "2",
                       "--use_peft", f"--load_in_{bits}bit")
    assert main(args) == 0
    assert layer in trained_layers  # the base really ran quantized
    assert (out / "adapter_config.json").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] and f"load_in_{bits}bit: true" in (out / "README.md").read_text()
    lora = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # B starts at zero: training moved it
    reward_model = RewardModel.load(out)
    saved = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if "score" in k}
    (head,) = saved.values()
    assert torch.equal(reward_model.model.score.weight.float(), head.float())  # the trained head, not a fresh one
    assert len(reward_model.score(["x", "y z"])) == 2


def test_ppo_pads_with_a_token_no_chat_prompt_contains(tiny_model_dir):
    """TRL treats every pad id as padding; SmolLM2 pads with its end-of-turn token, which chat prompts contain."""
    from transformers import AutoTokenizer

    from rlcd_data.tasks.chat import ChatRenderer
    from rlcd_data.train.ppo import _pad_outside_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    text = [tokenizer("\n\nHuman: hi\n\nAssistant:", add_special_tokens=False)["input_ids"]]
    _pad_outside_prompts(tokenizer, text)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the text format: unchanged
    chat = ChatRenderer(tokenizer).conversation("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:")
    encoded = [tokenizer(chat, add_special_tokens=False)["input_ids"]]
    assert tokenizer.eos_token_id in encoded[0]
    _pad_outside_prompts(tokenizer, encoded)
    assert tokenizer.pad_token_id not in encoded[0] and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_policy_generation_stops_at_the_next_human_turn_without_a_warning(tiny_model_dir, caplog):
    """PPO rollouts end at a stop string; TRL's generation arguments join a copy of the config (no warning)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlcd_data.train.ppo import _generate_with_stops

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = tokenizer("\n\nHuman: hi\n\nAssistant:", return_tensors="pt")
    # Greedy decoding of the random model, then a stop string taken from the middle of its own output.
    config = GenerationConfig(max_new_tokens=12, do_sample=False, suppress_tokens=[tokenizer.eos_token_id],
                              pad_token_id=tokenizer.eos_token_id)
    plain = model.generate(**prompt, generation_config=config)
    text = tokenizer.decode(plain[0, prompt["input_ids"].shape[1]:])
    stop = text[len(text) // 2:][:3]
    generate = _generate_with_stops(model.generate, tokenizer, [stop])
    with caplog.at_level("WARNING"):
        stopped = generate(**prompt, generation_config=config, max_new_tokens=12, temperature=1.0)
    response = tokenizer.decode(stopped[0, prompt["input_ids"].shape[1]:])
    assert stop in response and len(response) < len(text)
    assert "deprecated" not in caplog.text
    assert config.stop_strings is None  # the caller's config is left as it was


def test_ppo_on_a_trl_without_it_names_the_extra_that_brings_it_back(capsys, monkeypatch):
    """TRL removed PPO after 1.12; the reward and SFT recipes run on later releases, PPO says what to install."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trl.experimental.ppo" else real(name, *a))
    assert main(["train", "ppo", "--policy", "p", "--prompts", "q", "--reward_model", "r"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "has no PPO (TRL removed it after 1.12); pip install 'rlcd-data[ppo]'" in err


@pytest.mark.parametrize(("checkpointed", "layers", "expected"), [
    ("both", [], ((True, True), (True, True))),
    ("value", [], ((False, False), (True, True))),
    ("both", ["--checkpointed_layers", "1"], ((True, False), (True, False))),
])
def test_ppo_gradient_checkpointing_covers_policy_and_value_but_not_rollouts(tiny_reward_model, tiny_model_dir,
                                                                              tmp_path, capsys, monkeypatch,
                                                                              checkpointed, layers, expected):
    """TRL's PPOTrainer leaves --gradient_checkpointing unapplied; the recipe applies it to the layers of the
    trained models --checkpointed names (the first --checkpointed_layers, default all) and lifts it while the
    policy generates rollouts (it would turn their KV cache off), restoring it for every update's training."""
    from transformers import GenerationMixin
    from trl.experimental.ppo import ppo_trainer

    seen = {"generating": set(), "training": set()}
    real_forward, real_generate = ppo_trainer.forward, GenerationMixin.generate

    def flags(model):
        return tuple(layer.gradient_checkpointing for layer in model.model.layers)

    def forward(model, *args, **kwargs):
        if hasattr(model, "value_model"):  # the training pass through the policy and the value model
            seen["training"].add((flags(model.policy), flags(model.value_model)))
        return real_forward(model, *args, **kwargs)

    def generate(self, *args, **kwargs):
        seen["generating"].add(any(flags(self)))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(ppo_trainer, "forward", forward)
    monkeypatch.setattr(GenerationMixin, "generate", generate)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(4)))
    assert main(ppo_args(tiny_reward_model, tiny_model_dir, prompts, tmp_path / "ppo", 2, 8, "1e-3",
                         "--gradient_checkpointing", "true", "--checkpointed", checkpointed, "--prompt_format",
                         "text", *layers)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppo_updates"] == 2
    assert seen["training"] == {expected} and seen["generating"] == {False}


def test_ppo_checkpointed_layers_below_one_is_one_line(capsys):
    assert main(["train", "ppo", "--policy", "p", "--prompts", "q", "--reward_model", "r",
                 "--checkpointed_layers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--checkpointed_layers 0 is below 1" in err


RELEASE_PROBE = """
import sys
import torch
from rlcd_data.train.ppo import _release_free_memory_class

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

torch.ones(30 << 20, dtype=torch.uint8)  # freed at once: glibc's mmap threshold rises to 30 MiB
if sys.argv[1] == "release":
    _release_free_memory_class()()  # what train ppo does on a CPU unless --release_memory false
blocks = [torch.ones(2 << 20, dtype=torch.uint8) for _ in range(200)]  # 400 MiB in activation-sized blocks
before = rss_mib()
del blocks[:-1]  # the last block stays: it pins the top of the heap
print(before - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_release_memory_returns_freed_activation_blocks_to_the_system():
    """`train ppo --release_memory` (default): once glibc's mmap threshold has risen, freed blocks of a few MiB
    stay resident in the heap; with the recipe's setting they go back to the system when freed."""
    freed = {mode: float(subprocess.run([sys.executable, "-c", RELEASE_PROBE, mode], capture_output=True, text=True,
                                        check=True).stdout) for mode in ("keep", "release")}
    assert freed["keep"] < 100 and freed["release"] > 350, freed


def test_ppo_response_logits_equal_trls_full_logits_and_their_gradients(tiny_model_dir):
    """`train ppo --response_logits` (default): TRL's forward pass gives the same response logits, and the same
    gradients through them, when only the response positions' logits are computed."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.experimental.ppo.ppo_trainer import forward, selective_log_softmax

    from rlcd_data.train.ppo import _logits_at_responses

    torch.manual_seed(0)
    context, response = 9, 5
    query_responses = torch.randint(5, 200, (2, context + response))
    query_responses[0, :3] = 0  # left padding of the shorter prompt
    results = []
    for at_responses in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if at_responses:
            _logits_at_responses(model, response + 1)
        positions = []
        hook = model.lm_head.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[1]))
        output = forward(model, query_responses, 0)
        logits = output.logits[:, context - 1 : -1]
        hook.remove()
        assert output.logits.shape == (2, context + response, model.config.vocab_size)
        if at_responses:  # positions before the kept ones were never computed: said, not made up
            with pytest.raises(IndexError, match="--response_logits false computes them all"):
                output.logits[:, context - 2 : -1]
        assert positions == [response + 1 if at_responses else context + response]  # the head's work
        logprobs = selective_log_softmax(logits, query_responses[:, context:])
        logprobs.sum().backward()
        generated = model.generate(query_responses[1:, :context], max_new_tokens=3, do_sample=False,
                                   min_new_tokens=3)  # generation passes through the wrapper untouched
        results.append((logprobs.detach(), generated, model.lm_head.weight.grad.clone(),
                        model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    (full, full_generated, *full_grads), (kept, kept_generated, *kept_grads) = results
    assert torch.allclose(full, kept, atol=1e-5) and torch.equal(full_generated, kept_generated)
    assert kept_generated.shape[1] == context + 3
    for a, b in zip(full_grads, kept_grads):
        assert torch.allclose(a, b, atol=1e-5) and a.abs().sum() > 0

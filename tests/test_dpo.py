"""The DPO recipe with the tiny random Llama: learning, soft labels, formats, LoRA, eval policy, errors."""

from __future__ import annotations

import json

import pytest
from test_train import BAD, GOOD, record_trained_layers, toy_pairs

from rlcd_data.cli import main


def dpo_args(dataset, model, out, *extra):
    return [
        "train", "dpo", "--dataset", str(dataset), "--model", str(model), "--output_dir", str(out),
        "--preset", "dpo-cpu", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8",
        "--num_train_epochs", "4", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
        *extra,
    ]


def test_dpo_learns_a_separable_set_and_records_how(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "dpo"
    assert main(dpo_args(toy_pairs(tmp_path / "p.jsonl", n=16), tiny_model_dir, out)) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["pairs"] == 16 and metrics["steps"] == 8 and metrics["label_type"] == "hard (DPO)"
    assert metrics["loss_first_log"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference: -log sigmoid(0)
    assert metrics["loss_last_log"] < 0.5 * metrics["loss_first_log"]  # and it learns to prefer GOOD over BAD
    assert metrics["reward_accuracy_last_log"] > 0.9
    record = json.loads((out / "rlcd_recipe.json").read_text())
    assert record["recipe"] == "dpo" and record["base_model"] == str(tiny_model_dir)
    assert record["settings"]["prompt_format"] == "text" and record["settings"]["preset"] == "dpo-cpu"
    card = (out / "README.md").read_text()
    assert "rlcd-data train dpo" in card and "label_type: hard (DPO)" in card
    # the saved policy prefers the chosen response more than the base does
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "\n\nHuman: question 99?\n\nAssistant:"

    def margin(folder):
        import torch

        model = AutoModelForCausalLM.from_pretrained(folder).eval()

        def logp(text):
            ids = tokenizer(prompt + text, return_tensors="pt").input_ids
            n = len(tokenizer(prompt).input_ids)
            with torch.no_grad():
                logits = model(ids).logits[0, :-1].log_softmax(-1)
            return logits[n - 1:].gather(1, ids[0, n:, None]).sum().item()

        return logp(f" 99: {GOOD}") - logp(f" 99: {BAD}")

    assert margin(out) > margin(tiny_model_dir) + 1.0


def soft_trainer(tiny_model_dir, tmp_path, probabilities, swap=False):
    """A DPO trainer (not trained) on toy pairs with these chosen_probability values."""
    from rlcd_data.train import common, dpo

    path = tmp_path / f"soft-{swap}.jsonl"
    with open(path, "w") as f:
        for i, p in enumerate(probabilities):
            chosen, rejected = f" {i}: {GOOD}", f" {i}: {BAD}"
            if swap:
                chosen, rejected = rejected, chosen
            f.write(json.dumps({"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "chosen": chosen,
                                "rejected": rejected, "chosen_probability": p}) + "\n")
    parser = dpo.make_parser()
    (script, config, model_args), _ = common.parse(parser, dpo_args(path, tiny_model_dir, tmp_path / "o")[2:])
    trainer, *_ = dpo.make_trainer(script, config, model_args)
    return trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(len(probabilities))])


def test_soft_labels_give_conservative_dpo_loss(tiny_model_dir, tmp_path):
    """loss = mean of -(p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h)), checked by hand after one step
    moves the policy away from its reference (h != 0)."""
    import torch
    from torch.nn import functional as F

    probabilities = [1.0, 0.8, 0.5, 0.1]
    trainer, batch = soft_trainer(tiny_model_dir, tmp_path, probabilities)
    model = trainer.model
    with torch.no_grad():  # move the policy off its reference so that h is not 0
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token = logits[:, :-1].log_softmax(-1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    logps = (per_token * batch["completion_mask"][:, 1:]).sum(1)
    chosen, rejected = logps.chunk(2)
    h = (chosen - batch["ref_chosen_logps"]) - (rejected - batch["ref_rejected_logps"])
    assert h.abs().min() > 1e-3
    p, beta = torch.tensor(probabilities), trainer.beta
    hand = -(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h)).mean()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-4)


def test_a_pair_at_probability_one_half_prefers_neither_response(tiny_model_dir, tmp_path):
    """At p = 0.5 the loss does not change when chosen and rejected swap, and at the reference (h = 0) it
    pushes the policy nowhere; the same pairs at p = 1 do push it."""
    import torch

    def loss_and_gradient(probabilities, swap=False):
        trainer, batch = soft_trainer(tiny_model_dir, tmp_path, probabilities, swap)
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        gradient = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        return float(loss), gradient.abs().max().item()

    half, half_gradient = loss_and_gradient([0.5] * 4)
    swapped, _ = loss_and_gradient([0.5] * 4, swap=True)
    sure, sure_gradient = loss_and_gradient([1.0] * 4)
    assert half == pytest.approx(swapped, abs=1e-6)
    assert half_gradient < 1e-6 < 1e-3 < sure_gradient


def test_conversational_pairs_train_and_the_policy_loads_in_eval_policy(tiny_model_dir, tmp_path, capsys):
    """Chat-format pairs train through the tokenizer's chat template; `eval policy` samples the DPO policy in
    the format it learned, against its recorded base, as it does a PPO policy."""
    from test_train import reward_args

    pairs = tmp_path / "chat.jsonl"
    with open(pairs, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"question {i}?"}],
                                "chosen": [{"role": "assistant", "content": GOOD}],
                                "rejected": [{"role": "assistant", "content": BAD}]}) + "\n")
    out = tmp_path / "dpo-chat"
    assert main(dpo_args(pairs, tiny_model_dir, out, "--num_train_epochs", "1")) == 0
    capsys.readouterr()
    assert json.loads((out / "rlcd_recipe.json").read_text())["settings"]["prompt_format"] == "chat"
    rm = tmp_path / "rm"
    assert main(reward_args(toy_pairs(tmp_path / "p.jsonl", n=8), tiny_model_dir, rm, "--num_train_epochs", "1")) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about number {i}."}) + "\n" for i in range(3)))
    capsys.readouterr()
    assert main(["eval", "policy", "--policy", str(out), "--reward-model", str(rm), "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--samples", str(tmp_path / "samples.jsonl"), "--json",
                 "--backend", "transformers"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 3 and report["base"] == str(tiny_model_dir) and report["prompt_format"] == "chat"
    assert 0 <= report["policy_win_rate"] <= 1
    # and by an LLM judge, both orders, with the judge's figures in the policy's card
    assert main(["eval", "policy", "--policy", str(out), "--judge", str(tiny_model_dir), "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--samples", str(tmp_path / "judged.jsonl"), "--json",
                 "--backend", "transformers"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["judge"] == str(tiny_model_dir) and 0 <= report["judge_win_rate"] <= 1
    assert report["base"] == str(tiny_model_dir) and "judge_win_rate" in (out / "README.md").read_text()


def test_lora_policy_is_saved_merged(tiny_model_dir, tmp_path):
    out = tmp_path / "dpo-lora"
    assert main(dpo_args(toy_pairs(tmp_path / "p.jsonl", n=8), tiny_model_dir, out, "--max_steps", "1",
                         "--use_peft", "--lora_r", "4", "--lora_alpha", "8")) == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    assert "use_peft: true" in (out / "README.md").read_text()


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi", "text": "no pairs here"}, "not a pair dataset: no 'chosen' or 'rejected' column"),
    ({"prompt": "hi", "chosen": " a", "rejected": " b", "chosen_probability": 1.5},
     "chosen_probability of row 0 is 1.5, not a probability in [0, 1] (or pass --hard_labels)"),
])
def test_bad_input_is_one_line(row, message, tmp_path, capsys, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    assert main(dpo_args(bad, tiny_model_dir, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_hh_rlhf_pairs_with_the_prompt_inside_train(tiny_model_dir, hh_dir, tmp_path, capsys):
    """An HH-RLHF .jsonl file (no prompt column: the prompt is the shared start of chosen and rejected)."""
    out = tmp_path / "dpo-hh"
    assert main(dpo_args(hh_dir / "harmless-base-validation.jsonl", tiny_model_dir, out, "--limit", "8",
                         "--max_steps", "1")) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["pairs"] == 8 and metrics["steps"] == 1


@pytest.mark.parametrize("bits, layer", [("8", "Linear8bitLt"), ("4", "Linear4bit")])
def test_quantized_lora_policy_trains_on_cpu(tiny_model_dir, tmp_path, monkeypatch, bits, layer):
    """--load_in_8bit/--load_in_4bit --use_peft: a bitsandbytes base on the CPU; the adapter folder is saved."""
    from rlcd_data.train.dpo import soft_label_classes

    trained_layers = record_trained_layers(monkeypatch, soft_label_classes()[0])
    out = tmp_path / f"dpo-{bits}bit"
    assert main(dpo_args(toy_pairs(tmp_path / "p.jsonl", n=8), tiny_model_dir, out, "--max_steps", "1",
                         "--use_peft", f"--load_in_{bits}bit")) == 0
    assert layer in trained_layers and (out / "adapter_config.json").exists()
    assert f"load_in_{bits}bit: true" in (out / "README.md").read_text()

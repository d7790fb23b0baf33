"""The baselines: the A/B labeller, rlaif, rlcd-rescore and context distillation."""

from __future__ import annotations

import json
import math

import pytest
from conftest import StandInLM

from rlcd_data import BuildConfig, build
from rlcd_data.cli import main
from rlcd_data.errors import RlcdError


def prompts_file(tmp_path, n=4):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(n)))
    return path


class ControlledLM(StandInLM):
    """A causal LM stand-in whose next-token logits we set: at the last position, logit(A) = number of
    ``marker`` tokens in the (unpadded) input and logit(B) = 0; every earlier position strongly prefers B,
    so reading the wrong position (bad padding) would show."""

    def __init__(self, vocab_size, a_id, b_id, marker_id):
        super().__init__(vocab_size)
        self.a, self.b, self.marker = a_id, b_id, marker_id

    def logits(self, input_ids, attention_mask):
        import torch

        count = ((input_ids == self.marker) & attention_mask.bool()).sum(-1).float()
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[:, :-1, self.b] = 100.0
        logits[:, -1, self.a] = count
        return logits


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_option_tokens_are_single_tokens_after_paren(smollm2_tokenizer, tiny_model_dir):
    from transformers import AutoTokenizer

    from rlcd_data.generate.labeller import ANSWER_PREFIX, option_token_ids

    a, b = option_token_ids(smollm2_tokenizer)
    assert smollm2_tokenizer.decode([a]) == "A" and smollm2_tokenizer.decode([b]) == "B" and a != b
    # what the tokenizer does after "(" is what counts, not the bare letters' ids in another context
    ids = smollm2_tokenizer(ANSWER_PREFIX + "A", add_special_tokens=False)["input_ids"]
    assert ids[-1] == a
    assert option_token_ids(AutoTokenizer.from_pretrained(tiny_model_dir)) == (a, b)


def test_option_tokens_must_be_single(smollm2_tokenizer):
    from rlcd_data.errors import RlcdError
    from rlcd_data.generate.labeller import option_token_ids

    with pytest.raises(RlcdError, match="one token"):
        option_token_ids(smollm2_tokenizer, prefix="The answer is: (A")  # "AA" merges or splits differently


def test_labeller_reads_the_last_position_softmax_over_a_and_b(smollm2_tokenizer):
    from rlcd_data.generate.labeller import TransformersLabeller, option_token_ids

    a, b = option_token_ids(smollm2_tokenizer)
    marker = smollm2_tokenizer(" zebra", add_special_tokens=False)["input_ids"]
    assert len(marker) == 1
    model = ControlledLM(len(smollm2_tokenizer), a, b, marker[0])
    labeller = TransformersLabeller(model, smollm2_tokenizer, batch_size=2)
    labeller.model = model
    prompts = [
        "short zebra The answer is: (",
        "a much longer prompt with no marker at all, padded less than the others The answer is: (",
        "x zebra zebra zebra The answer is: (",
    ]
    got = labeller.first_option_probability(prompts)
    expected = [1 / (1 + math.exp(-k)) for k in (1, 0, 3)]
    assert got == pytest.approx(expected, abs=1e-6)
    assert model.calls == 2  # batched: 3 prompts at batch size 2


def test_labeller_with_the_tiny_model_matches_its_logits(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlcd_data.generate.labeller import TransformersLabeller, option_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    labeller = TransformersLabeller(model, tokenizer, batch_size=4)
    prompts = ["Options: (A) yes (B) no The answer is: (", "Which? Options: (A) a longer answer (B) b The answer is: ("]
    batched = labeller.first_option_probability(prompts)
    a, b = option_token_ids(tokenizer)
    for prompt, p in zip(prompts, batched):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        assert p == pytest.approx(torch.softmax(logits[[a, b]], -1)[0].item(), abs=1e-5)


class OptionLabeller:
    """A labeller that prefers the option whose text contains 'good' (P(A) = 0.9 or 0.1),
    or, with ``bias``, says P(A) = bias whatever the options (pure position bias)."""

    def __init__(self, bias=None):
        self.bias = bias
        self.prompts = []

    def first_option_probability(self, prompts):
        self.prompts += prompts
        out = []
        for p in prompts:
            a = p.split("(A) ", 1)[1].split("\n(B) ")[0]
            out.append(self.bias if self.bias is not None else 0.9 if "good" in a else 0.1)
        return out


def test_rlaif_orders_by_the_labeller_and_keeps_its_probability(tmp_path, fake_generator):
    import datasets

    def respond(prompt, n):
        assert "Assistant (" not in prompt  # rlaif samples from the unmodified prompt
        return ("good answer" if n % 2 else "bad answer"), True

    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(tmp_path / "out"),
                         method="rlaif")
    labeller = OptionLabeller()
    build(config, generator=fake_generator(respond), labeller=labeller, progress=False)
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train").to_list()
    assert len(rows) == 4 and len(labeller.prompts) == 4
    for row in rows:
        assert row["chosen"] == " good answer" and row["rejected"] == " bad answer"
        assert row["chosen_probability"] == pytest.approx(0.9)
        assert 0 <= row["instruction_index"] < 16
    assert labeller.prompts[0].endswith("The answer is: (") and "Question number" in labeller.prompts[0]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`rlaif`" in card and "scorer version 1" in card and "averaged: no" in card


def test_label_cot_reads_the_label_after_a_greedy_rationale(tmp_path, fake_generator):
    import datasets
    import yaml

    asked = []

    def respond(prompt, n):
        if prompt.endswith("Rationale:"):  # the labeller's chain of thought
            asked.append(prompt)
            return " The first one is polite. The answer is: (A", True
        return ("good answer" if n % 2 else "bad answer"), True

    generator = fake_generator(respond)
    seen_settings = []
    original = generator.generate

    def generate(prompts, seeds, settings, on_progress=None):
        seen_settings.append(settings)
        return original(prompts, seeds, settings, on_progress)

    generator.generate = generate
    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(tmp_path / "out"),
                         method="rlaif", label_cot=True)
    labeller = OptionLabeller()
    build(config, generator=generator, labeller=labeller, progress=False)
    assert len(asked) == 4 and all("Question number" in p and "The answer is: (" not in p for p in asked)
    assert all(p.endswith("Rationale: The first one is polite.\nThe answer is: (") for p in labeller.prompts)
    greedy = [s for s in seen_settings if s.top_k == 1]
    assert len(greedy) == 1 and greedy[0].max_new_tokens == 64
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train").to_list()
    assert len(rows) == 4 and all(r["chosen_probability"] == pytest.approx(0.9) for r in rows)
    assert yaml.safe_load((tmp_path / "out" / "rlcd_build.yaml").read_text())["label_cot"] is True
    assert "before the label): yes" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(RlcdError, match="--label-cot applies to rlaif and rlcd-rescore"):
        BuildConfig(task="harmless", label_cot=True)


def test_label_both_orders_cancels_position_bias(tmp_path, fake_generator):
    import datasets

    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 2)), output=str(tmp_path / "out"),
                         method="rlaif", label_both_orders=True)
    labeller = OptionLabeller(bias=0.8)  # always prefers whatever is shown first
    build(config, generator=fake_generator(lambda p, n: (f"answer {n}", True)), labeller=labeller, progress=False)
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train").to_list()
    assert len(labeller.prompts) == 4  # each pair in both orders
    assert all(r["chosen_probability"] == pytest.approx(0.5) for r in rows)
    assert "averaged: yes" in (tmp_path / "out" / "README.md").read_text()


def test_rlcd_rescore_keeps_the_construction_label(tmp_path, fake_generator):
    import datasets

    from rlcd_data.tasks.catalog import load_task

    positives = {d.positive for d in load_task("harmless").descriptors}

    def respond(prompt, n):  # p+ writes the good reply for even questions, p- for odd ones
        i = int(prompt.split("Question number ")[1].split("?")[0])
        is_p_plus = prompt.rsplit("Assistant (", 1)[1].split("):")[0] in positives
        good = is_p_plus == (i % 2 == 0)
        return ("good" if good else "bad") + f" reply {i}", True

    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 6)), output=str(tmp_path / "rescore"),
                         method="rlcd-rescore")
    labeller = OptionLabeller()
    build(config, generator=fake_generator(respond), labeller=labeller, progress=False)
    rows = datasets.load_dataset(str(tmp_path / "rescore"), split="train").to_list()
    task_instructions = load_task("harmless").instructions
    for row, prompt in zip(rows, labeller.prompts):
        assert row["chosen"].startswith(" good") and row["chosen_probability"] == pytest.approx(0.9)
        # the labeller agrees with construction exactly where p+ wrote the good reply
        assert row["chosen_is_p_plus"] == (row["source_index"] % 2 == 0)
        assert task_instructions[row["descriptor_index"]] in prompt  # instruction matched to the descriptor
    # the A/B order is shuffled per example, not always p+ first
    firsts = [p.split("(A) ")[1].split("\n")[0] for p in labeller.prompts]
    p_plus_first = [f.startswith("good") == (int(f.split()[-1]) % 2 == 0) for f in firsts]
    assert 0 < sum(p_plus_first) < len(p_plus_first)
    card = (tmp_path / "rescore" / "README.md").read_text()
    assert "agrees with construction on" in card


def test_context_distillation_writes_prompt_completion(tmp_path, fake_generator):
    import datasets

    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 3)), output=str(tmp_path / "cd"),
                         method="context-distillation")
    generator = fake_generator()
    build(config, generator=generator, progress=False)
    rows = datasets.load_dataset(str(tmp_path / "cd"), split="train").to_list()
    assert [r["completion"] for r in rows] == [" " + r["positive_descriptor"] for r in rows]
    assert set(rows[0]) == {"prompt", "completion", "p_plus", "descriptor_index", "positive_descriptor",
                            "negative_descriptor", "source_index", "completion_tokens"}
    assert all("Assistant (" in p for batch in generator.requests for p in batch)  # p+ only
    assert len({p for b in generator.requests for p in b}) == 3  # one output per example
    assert "context distillation" in (tmp_path / "cd" / "README.md").read_text()


@pytest.mark.parametrize("method", ["rlaif", "rlcd-rescore", "context-distillation"])
def test_each_method_end_to_end_with_the_tiny_model(tmp_path, tiny_model_dir, method):
    import datasets

    out = tmp_path / method
    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 3)), output=str(out), method=method,
                         model=str(tiny_model_dir), backend="transformers", max_new_tokens=24, batch_size=4, max_retries=8)
    result = build(config, progress=False)
    rows = datasets.load_dataset(str(out), split="train").to_list()
    assert len(rows) == result.stats.pairs >= 1
    if method == "context-distillation":
        assert all(r["completion"].strip() for r in rows)
    else:
        assert all(0.5 <= r["chosen_probability"] <= 1.0 for r in rows)
    assert f"`{method}`" in (out / "README.md").read_text()


def test_rescore_generates_the_same_outputs_as_rlcd(tmp_path, tiny_model_dir):
    import datasets

    common = dict(prompts=str(prompts_file(tmp_path, 3)), model=str(tiny_model_dir), backend="transformers",
                  max_new_tokens=24, batch_size=4, max_retries=8)
    build(BuildConfig(task="harmless", output=str(tmp_path / "a"), **common), progress=False)
    build(BuildConfig(task="harmless", output=str(tmp_path / "b"), method="rlcd-rescore", **common), progress=False)
    rlcd = datasets.load_dataset(str(tmp_path / "a"), split="train").to_list()
    rescore = datasets.load_dataset(str(tmp_path / "b"), split="train").to_list()
    assert [(r["source_index"], r["chosen"], r["rejected"]) for r in rlcd] == [
        (r["source_index"], *((r["chosen"], r["rejected"]) if r["chosen_is_p_plus"] else (r["rejected"], r["chosen"])))
        for r in rescore
    ]


def test_unknown_method_and_unsupported_method_are_one_line_errors(tmp_path, capsys):
    assert main(["build", "harmless", "--method", "magic", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "magic" in err and len(err.strip().splitlines()) == 1
    # a user task without compare.jinja supports rlcd and context distillation only
    import shutil

    from rlcd_data.resources import resource_dir

    user = tmp_path / "tasks" / "mine"
    shutil.copytree(resource_dir("templates") / "helpful", user)
    (user / "compare.jinja").unlink()
    (user / "rate.jinja").unlink()
    text = (user / "task.yaml").read_text()
    (user / "task.yaml").write_text(text[: text.index("# The RLAIF labeller")])
    assert main(["build", "mine", "--templates", str(tmp_path / "tasks"), "--method", "rlaif",
                 "--output", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "task 'mine' does not support --method rlaif" in err and "rlcd, context-distillation" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o2").exists()
    assert main(["build", "harmless", "--label-both-orders", "--output", str(tmp_path / "o3")]) == 2
    assert "--label-both-orders applies to rlaif and rlcd-rescore" in capsys.readouterr().err


def test_compare_template_checks(tmp_path):
    import shutil

    from rlcd_data.errors import RlcdError
    from rlcd_data.resources import resource_dir
    from rlcd_data.tasks.folder import load_task_folder

    folder = tmp_path / "t"
    shutil.copytree(resource_dir("templates") / "helpful", folder)
    (folder / "compare.jinja").write_text("{{ instruction }} {{ response_a }} {{ response_b }} {{ respons_c }}\nThe answer is: (")
    with pytest.raises(RlcdError, match="undefined template variable.*respons_c"):
        load_task_folder(folder)
    (folder / "compare.jinja").write_text("{{ instruction }} {{ response_a }} {{ response_b }}\nAnswer:")
    with pytest.raises(RlcdError, match="must end with 'The answer is: \\('"):
        load_task_folder(folder)

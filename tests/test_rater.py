"""Direct RLAIF: the 1-10 rater, `rlcd-data score --llm`, and the rating templates."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import StandInLM

from rlcd_data.cli import main
from rlcd_data.errors import RlcdError
from rlcd_data.generate.rater import LLMRater, rate_pairs, score_token_ids, to_reward
from rlcd_data.tasks.catalog import list_tasks, load_task
from rlcd_data.tasks.task import RATING_START


class SetLogits(StandInLM):
    """A causal LM stand-in whose logits at the last two positions are set: ``first`` (token id -> logit) where
    the score's first token comes, ``second`` where the token after it comes; every other logit is -1e4."""

    def __init__(self, vocab_size, first: dict, second: dict):
        super().__init__(vocab_size)
        self.first, self.second = first, second
        self.seen = []

    def logits(self, input_ids, attention_mask):
        import torch

        self.seen += input_ids.tolist()
        logits = torch.full((*input_ids.shape, self.vocab_size), -1e4)
        for position, values in ((-2, self.first), (-1, self.second)):
            for token, value in values.items():
                logits[:, position, token] = value
        return logits


@pytest.fixture(scope="module")
def digit_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)  # writes 10 as "1" then "0"


@pytest.fixture(scope="module")
def number_tokenizer():
    """A word-level tokenizer with one token for every score, 10 included."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "The", "rating", "is", ":", "(", "ok", *map(str, range(1, 11))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def test_expected_score_when_ten_is_two_digits_equals_the_hand_computation(digit_tokenizer):
    digits, zero = score_token_ids(digit_tokenizer)
    assert zero is not None and len(digits) == 9
    weights = [0.5, 0, 0, 0, 1.0, 0, 2.0, 0, 0]  # logits of the digits 1..9 after the prompt
    model = SetLogits(len(digit_tokenizer), dict(zip(digits, weights)), {zero: math.log(0.25), 0: math.log(0.75)})
    rater = LLMRater(model, digit_tokenizer)
    [score] = rater.expected_scores(["Rate it. " + RATING_START])
    q = [math.exp(w) for w in weights]
    q = [x / sum(q) for x in q]
    p_zero = 0.25  # "0" after "1": 1/4 of the mass of "1" is a 10
    hand = sum((d + 1) * x for d, x in enumerate(q)) - q[0] * p_zero + 10 * q[0] * p_zero
    assert score == pytest.approx(hand, rel=1e-5)
    assert rater.rewards(["Rate it. " + RATING_START])[0] == pytest.approx((hand - 5.5) / 4.5, rel=1e-5)
    # the second position read is the "1" appended after the prompt
    assert model.seen[0][-1] == digits[0]


def test_expected_score_when_every_score_is_one_token(number_tokenizer):
    ids, zero = score_token_ids(number_tokenizer)
    assert zero is None and len(ids) == 10
    model = SetLogits(len(number_tokenizer), {}, {ids[9]: 0.0, ids[1]: 0.0})  # "10" and "2" equally likely
    [score] = LLMRater(model, number_tokenizer).expected_scores(["ok " + RATING_START])
    assert score == pytest.approx(6.0)
    batches = []  # what a progress bar is told: every prompt once, a batch at a time
    scores = LLMRater(model, number_tokenizer, batch_size=2).expected_scores(["ok " + RATING_START] * 5, batches.append)
    assert batches == [2, 2, 1] and scores == pytest.approx([6.0] * 5)


def test_reward_maps_one_to_ten_onto_minus_one_to_one():
    assert (to_reward(1), to_reward(5.5), to_reward(10)) == (-1.0, 0.0, 1.0)


def test_a_tokenizer_without_score_tokens_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "The": 1, "rating": 2, "is": 3, ":": 4, "(": 5}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(RlcdError, match="does not encode the scores 1 to 10"):
        score_token_ids(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]"))


def test_rate_pairs_compares_the_two_sides(number_tokenizer):
    """A stand-in that rates 9 whatever contains "ok" and 2 otherwise: agreement follows the text."""
    ids, _ = score_token_ids(number_tokenizer)

    class ByContent(SetLogits):
        def logits(self, input_ids, attention_mask):
            logits = super().logits(input_ids, attention_mask)
            ok = number_tokenizer.convert_tokens_to_ids("ok")
            for row in range(input_ids.shape[0]):
                logits[row, -1, ids[8 if ok in input_ids[row].tolist() else 1]] = 50.0
            return logits

    class Task:  # renders "<response> The rating is: ("
        def render_rating(self, prompt, response, chat=None):
            return f"{response} {RATING_START}"

    pairs = [{"prompt": "p", "chosen": "ok", "rejected": "The"}, {"prompt": "p", "chosen": "The", "rejected": "ok"},
             {"prompt": "p", "chosen": "ok", "rejected": "ok"}]
    report = rate_pairs(LLMRater(ByContent(len(number_tokenizer), {}, {}), number_tokenizer), Task(), pairs)
    assert report["pairs"] == 3 and report["ties"] == 1
    assert report["agreement"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert report["mean_score_chosen"] == pytest.approx((9 + 2 + 9) / 3, rel=1e-4)


def test_rating_templates_are_checked(tmp_path):
    root = tmp_path / "tasks"
    shutil.copytree(list_tasks()["harmless"], root / "harmless")
    rate, meta = root / "harmless" / "rate.jinja", root / "harmless" / "task.yaml"
    assert load_task("harmless", root).render_rating("\n\nHuman: hi\n\nAssistant:", " hello").endswith(RATING_START)
    original = rate.read_text()
    rate.write_text(original.replace("{{ response }}", "the response"))
    with pytest.raises(RlcdError, match=r"rate.jinja: never uses response"):
        load_task("harmless", root)
    rate.write_text(original.replace("The rating is: (", "Rating:"))
    with pytest.raises(RlcdError, match=r"rate.jinja: must end with 'The rating is: \('"):
        load_task("harmless", root)
    rate.write_text(original)
    meta.write_text(meta.read_text().split("rater:")[0])
    with pytest.raises(RlcdError, match=r"task.yaml: rate.jinja needs a `rater:` section"):
        load_task("harmless", root)


def test_score_cli_rates_validation_pairs_with_the_tiny_model(tiny_model_dir, hh_dir, capsys):
    assert main(["score", "--llm", str(tiny_model_dir), "--pairs", str(hh_dir / "harmless-base-validation.jsonl"),
                 "--limit", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 3 and report["prompt_format"] == "text"
    assert 1 <= report["mean_score_chosen"] <= 10 and 1 <= report["mean_score_rejected"] <= 10
    assert main(["score", "--llm", str(tiny_model_dir), "--pairs", "nope.jsonl"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


@pytest.mark.real_model
def test_smollm2_rates_hh_pairs_as_its_logits_say(smollm2_dir, hh_dir):
    """The real model: each expected score equals the one computed by hand from its full logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlcd_data.sources.pairs import load_pairs, pair_responses

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    task = load_task("harmless")
    pairs = load_pairs(hh_dir / "harmless-base-validation.jsonl", limit=4)
    rater = LLMRater(model, tokenizer, batch_size=3)
    report = rate_pairs(rater, task, pairs)
    assert report["pairs"] == 4 and 1 < report["mean_score_chosen"] < 10
    prompt, chosen, _ = pair_responses(pairs[0])
    text = task.render_rating(prompt, chosen)
    digits, zero = score_token_ids(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [digits[0]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    q = torch.softmax(logits[-2, digits], -1)
    p_zero = torch.softmax(logits[-1], -1)[zero]
    hand = float(sum((d + 1) * q[d] for d in range(9)) + 9 * q[0] * p_zero)
    assert rater.expected_scores([text])[0] == pytest.approx(hand, rel=1e-4)

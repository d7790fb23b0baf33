"""The quality report (`rlcd-data inspect` / `compare`): every figure on constructed data where it is known."""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from rlcd_data.cli import main
from rlcd_data.pipeline.config import BuildConfig
from rlcd_data.pipeline.run import build
from rlcd_data.quality import measures as quality
from rlcd_data.quality.report import BEGIN, END, compare_datasets, inspect_dataset, load, write_card_section

KIND = ["Thanks for asking, here is a calm and careful answer.", "Happy to help; please stay safe and kind.",
        "That is a thoughtful question, let me explain gently.", "I would suggest talking to someone you trust."]
RUDE = ["No. Figure it out yourself, idiot.", "Whatever, go break something.",
        "Stupid question, I refuse, loser.", "Go away and hurt someone else."]


def write_pairs(path, pairs, **extra_columns):
    with path.open("w") as f:
        for i, (chosen, rejected) in enumerate(pairs):
            row = {"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "chosen": chosen, "rejected": rejected}
            row.update({k: v[i] for k, v in extra_columns.items()})
            f.write(json.dumps(row) + "\n")
    return path


def separable_pairs(n, seed=0):
    rng = random.Random(seed)
    return [(f"{rng.choice(KIND)} ({i})", f"{rng.choice(RUDE)} ({i})") for i in range(n)]


def data(pairs, **kw):
    chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
    return quality.PairData(chosen, rejected, [len(c.split()) for c in chosen], [len(r.split()) for r in rejected],
                            "words", **kw)


def test_length_rule_accuracy_is_one_when_chosen_is_always_longer_and_half_on_ties():
    longer = quality.length_bias(data([("a b c d", "a b"), ("one two three", "one")]))
    assert longer["longer_is_chosen_accuracy"] == 1.0 and longer["chosen_longer"] == 1.0
    assert longer["chosen"]["mean"] == 3.5 and longer["rejected"]["median"] == 1.5
    shorter = quality.length_bias(data([("a", "a b"), ("x y", "x y"), ("p", "p q r")]))
    assert shorter["ties"] == pytest.approx(1 / 3)
    assert shorter["longer_is_chosen_accuracy"] == pytest.approx((0 + 0.5) / 3)


def test_shape_counts_identical_near_identical_empty_and_unfinished_pairs():
    long_text = " ".join(f"word{i}" for i in range(40))
    pairs = [
        ("Same answer.", "  same   ANSWER. "),  # identical after normalising case and space
        (long_text + " end.", long_text + " finish."),  # near-identical
        ("Completely different.", "Nothing alike here."),
        ("", "An answer that stops in the mid"),
    ]
    shape = quality.shape(data(pairs, max_new_tokens=3))
    assert shape["identical"] == 1 and shape["near_identical"] == 1
    assert shape["empty"] == {"chosen": 1, "rejected": 0}
    assert shape["unfinished"] == {"chosen": 0, "rejected": 1}
    assert shape["at_token_limit"] == {"chosen": 1, "rejected": 3, "limit": 3}  # lengths >= 3 (here: words)
    stricter = quality.shape(data(pairs), threshold=0.999)
    assert stricter["near_identical"] == 0 and stricter["at_token_limit"] is None


def test_separable_pairs_give_separability_near_one_and_shuffled_ones_chance():
    pairs = separable_pairs(200)
    separable = quality.lexical_separability([c for c, _ in pairs], [r for _, r in pairs])
    assert separable["accuracy"] > 0.97 and separable["ci95"][0] > 0.9 and separable["folds"] == 5
    rng = random.Random(1)
    shuffled = [(c, r) if rng.random() < 0.5 else (r, c) for c, r in pairs]
    chance = quality.lexical_separability([c for c, _ in shuffled], [r for _, r in shuffled])
    assert abs(chance["accuracy"] - 0.5) < 0.1 and chance["ci95"][0] < 0.5 < chance["ci95"][1]
    identical = quality.lexical_separability([c for c, _ in pairs], [c for c, _ in pairs])
    assert identical["accuracy"] == 0.5  # the same text on both sides scores the same: a tie, half right
    assert quality.lexical_separability(["a"] * 9, ["b"] * 9) is None  # fewer than two pairs per fold


def test_characteristic_words_match_the_monroe_formula():
    chosen = ["please help kindly", "please be safe", "kindly please"]
    rejected = ["idiot go", "idiot idiot please", "go away"]
    words = quality.characteristic_words(chosen, rejected)
    n_c, n_r = 8, 7  # words on each side; the prior is the pooled count of each word

    def z(y_c, y_r):
        a, a0 = y_c + y_r, n_c + n_r
        delta = math.log((y_c + a) / (n_c + a0 - y_c - a)) - math.log((y_r + a) / (n_r + a0 - y_r - a))
        return round(delta / math.sqrt(1 / (y_c + a) + 1 / (y_r + a)), 2)

    assert words["rejected"][0] == {"word": "idiot", "z": z(0, 3), "chosen": 0, "rejected": 3}
    by_word = {w["word"]: w for w in words["chosen"]}
    assert by_word["please"]["z"] == z(3, 1) and by_word["kindly"]["z"] == z(2, 0)
    assert [w["word"] for w in words["chosen"]][:2] == sorted(["please", "kindly"], key=lambda w: -by_word[w]["z"])
    assert all(w["z"] > 0 for w in words["chosen"]) and all(w["z"] < 0 for w in words["rejected"])


def test_characteristic_words_of_sides_that_are_one_word_are_none(recwarn):
    assert quality.characteristic_words(["yes", "yes"], ["yes"]) == {"chosen": [], "rejected": []}
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_soft_labels_histogram_and_agreement_with_construction():
    pairs = [("a.", "b.")] * 4
    d = data(pairs, probabilities=[0.5, 0.55, 0.9, 1.0], chosen_is_p_plus=[True, False, True, True])
    soft = quality.soft_labels(d)
    assert soft["mean"] == pytest.approx(0.7375) and soft["near_half"] == 0.5
    assert soft["histogram"]["counts"] == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert soft["agrees_with_construction"] == 0.75


def test_wilson_interval():
    low, high = quality.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)


def test_inspect_hh_style_file_reads_the_final_response_and_says_no_signal(tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(60):  # chosen and rejected drawn from the same pool: no signal
        a, b = rng.choice(KIND + RUDE), rng.choice(KIND + RUDE)
        rows.append({"chosen": f"\n\nHuman: q{i}\n\nAssistant: {a}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: {b}"})
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = inspect_dataset(str(path))
    assert result["lengths"]["unit"] == "words"
    assert result["lengths"]["chosen"]["mean"] == pytest.approx(
        sum(len(r["chosen"].split("Assistant:")[1].split()) for r in rows) / 60)
    assert not any(w["word"] in ("human", "assistant") for w in result["words"]["chosen"] + result["words"]["rejected"])
    if result["lexical_separability"]["ci95"][0] <= 0.5:
        assert result["verdicts"][0].startswith("No lexical signal")


def test_judge_agreement_equals_the_hand_count(tmp_path, monkeypatch):
    from rlcd_data.train import reward_model

    class CountingJudge:  # scores a text by how often it says "kind"
        tokenizer = None

        def score(self, texts):
            return [float(t.count("kind")) for t in texts]

    monkeypatch.setattr(reward_model.RewardModel, "load", classmethod(lambda cls, *a, **k: CountingJudge()))
    pairs = [("kind kind", "kind"), ("kind", "rude"), ("rude", "kind"), ("same", "same"), ("kind", "kind kind kind")]
    path = write_pairs(tmp_path / "pairs.jsonl", pairs)
    (tmp_path / "judge").mkdir()
    result = inspect_dataset(str(path), judge=str(tmp_path / "judge"))
    assert result["judge"]["accuracy"] == 2 / 5  # pairs 0 and 1; a tie counts as disagreement
    assert result["judge"]["ci95"] == list(quality.wilson_interval(2, 5))
    assert "The judge does not agree with the labels beyond chance: 40%" in " ".join(result["verdicts"])


def test_build_card_has_the_report_and_plots_that_exist(tmp_path, fake_generator):
    from PIL import Image

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    build(BuildConfig(task="harmless", prompts=str(prompts), output=str(out)), generator=fake_generator(), progress=False)
    card = (out / "README.md").read_text()
    assert card.count(BEGIN) == 1 and card.count(END) == 1 and "## Quality report" in card
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert sorted(links) == ["images/descriptors.png", "images/lengths.png"]
    for link in links:
        with Image.open(out / link) as image:
            assert image.format == "PNG" and image.size[0] == 700 and image.size[1] >= 400
    # the fake generator answers with the descriptor: p+ and p- outputs differ in their words
    separability = float(re.search(r"\| lexical separability \| ([0-9.]+) ", card).group(1))
    assert "Lexical signal" in card and separability > 0.9


def test_write_card_replaces_the_earlier_report_and_keeps_the_rest(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: mit\n---\n# My data\n\nSome text.\n\n## Citation\n\ncite me\n")
    write_card_section(card, f"{BEGIN}\nfirst\n{END}\n")
    write_card_section(card, f"{BEGIN}\nsecond\n{END}\n")
    text = card.read_text()
    assert text.count(BEGIN) == 1 and "second" in text and "first" not in text
    assert text.startswith("---\nlicense: mit\n---\n# My data") and text.index("second") < text.index("## Citation")


def test_inspect_cli_json_and_write_card_on_a_foreign_folder(tmp_path, capsys):
    import datasets

    folder = tmp_path / "theirs"
    datasets.Dataset.from_list(
        [{"prompt": "Q?", "chosen": c, "rejected": r} for c, r in separable_pairs(40)]
    ).to_parquet(str(folder / "data" / "train.parquet"))
    assert main(["inspect", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 40 and result["lexical_separability"]["accuracy"] > 0.9
    assert main(["inspect", str(folder), "--write-card"]) == 0
    out = capsys.readouterr().out
    assert "lexical separability" in out and "wrote the report" in out
    assert (folder / "images" / "lengths.png").is_file() and BEGIN in (folder / "README.md").read_text()


def test_compare_matches_datasets_by_source_index(tmp_path, capsys):
    a = write_pairs(tmp_path / "a.jsonl", separable_pairs(30), source_index=list(range(30)))
    b = write_pairs(tmp_path / "b.jsonl", [(r, c) for c, r in separable_pairs(30)], source_index=list(range(10, 40)))
    result = compare_datasets([str(a), str(b)], plot=tmp_path / "cmp.png")
    assert result["matched_prompts"] == 20
    assert [r["pairs"] for r in result["datasets"].values()] == [20, 20]
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    code = main(["compare", str(a), str(b), "--plot", str(tmp_path / "c.png"), "--no-match"])
    out = capsys.readouterr().out
    assert code == 0 and "a.jsonl" in out and "b.jsonl" in out and "matched" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "{tmp}/empty"], "empty"),
        (["inspect", "{tmp}/nopairs.jsonl"], "not a pair dataset: no 'chosen' or 'rejected' column"),
        (["inspect", "{tmp}/pairs.jsonl", "--judge", "{tiny}"], "a reward model has one output, this one has 2"),
        (["inspect", "{tmp}/pairs.jsonl", "--judge", "{tmp}/missing"], "no such reward model folder"),
        (["compare", "{tmp}/pairs.jsonl"], "compare needs at least two datasets"),
        (["inspect", "{tmp}/pairs.jsonl", "--write-card"], "--write-card needs a dataset folder"),
    ],
)
def test_bad_input_is_one_line(argv, message, tmp_path, capsys, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nopairs.jsonl").write_text('{"prompt": "hi"}\n')
    write_pairs(tmp_path / "pairs.jsonl", separable_pairs(4))
    code = main([a.format(tmp=tmp_path, tiny=tiny_model_dir) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rlcd-data: error: ") and message in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.real_model
def test_reward_model_separability_learns_a_separable_set(tmp_path):
    from rlcd_data.quality.model_measures import reward_model_separability

    path = write_pairs(tmp_path / "pairs.jsonl", separable_pairs(40))
    table, _ = load(str(path))
    result = reward_model_separability(table, folds=2)
    assert len(result["per_fold"]) == 2 and result["accuracy"] > 0.8

"""The build pipeline with a fake generator: alignment, retries, output folder, card, config."""

from __future__ import annotations

import json

import pytest
import yaml

from rlcd_data.errors import RlcdError
from rlcd_data.pipeline.config import BuildConfig, read_config_file
from rlcd_data.pipeline.run import build
from rlcd_data.pipeline.run_options import RunOptions


def prompts_file(tmp_path, n=6):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(n)))
    return path



def answer_with_question_and_descriptor(prompt, n):
    """A reply that names the question and the descriptor of the final tag the model saw."""
    question = prompt.rsplit("Question number ", 1)[1].split("?")[0]
    descriptor = prompt.rsplit("Assistant (", 1)[1].removesuffix("):")
    return f"{question} / {descriptor}", True


def test_rows_keep_p_plus_and_p_minus_aligned(tmp_path, fake_generator):
    import datasets

    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(tmp_path / "out"), batch_size=2)
    result = build(config, generator=fake_generator(answer_with_question_and_descriptor), progress=False)
    rows = datasets.load_dataset(str(result.output), split="train").to_list()
    assert len(rows) == 6 and result.stats.pairs == 6
    for i, row in enumerate(rows):
        assert row["source_index"] == i
        assert row["prompt"] == f"\n\nHuman: Question number {i}?\n\nAssistant:"
        # completions continue the prompt as in TRL's HH-RLHF copies: prompt + chosen is the conversation
        assert row["chosen"] == f" {i} / {row['positive_descriptor']}"
        assert row["rejected"] == f" {i} / {row['negative_descriptor']}"
        assert row["p_plus"] == f"\n\nHuman: Question number {i}?\n\nAssistant ({row['positive_descriptor']}):"
        assert row["chosen_tokens"] == len(row["chosen"].split())


@pytest.mark.parametrize(
    "batch_size, calls, streaming",
    [(1, 8 + 10, False), (32, 8 * 4, False), (1, 8 + 10, True), (4, None, True)],  # None: tail attempts run early
)
def test_failed_outputs_are_retried_then_dropped(tmp_path, fake_generator, queue_generator, batch_size, calls,
                                                 streaming):
    """With free batch slots later attempts run alongside earlier ones; a generator that takes requests
    during a call runs each retry in the same call; the outcome is always the sequential one."""

    def respond(prompt, n):
        if "Question number 1?" in prompt:
            return "never ends", False  # cut off at the token limit every time
        if "Question number 2?" in prompt and n < 2:
            return "", True  # empty on attempts 0 and 1, fine on attempt 2
        return f"fine {n}", True

    generator = (queue_generator if streaming else fake_generator)(respond)
    config = BuildConfig(
        task="harmless", prompts=str(prompts_file(tmp_path, 4)), output=str(tmp_path / "out"),
        max_retries=3, batch_size=batch_size,
    )
    result = build(config, generator=generator, progress=False)
    assert len(generator.requests) == (1 if streaming or batch_size == 32 else 4)  # generate() calls
    assert result.stats.pairs == 3 and result.stats.examples_dropped == 1
    assert result.stats.dropped_source_indices == [1]
    # question 1: both sides retried 3 times; question 2: both sides retried twice.
    assert result.stats.outputs_retried == 2 * 3 + 2 * 2
    assert sum(generator.calls.values()) == calls if calls else 8 + 10 <= sum(generator.calls.values()) <= 8 * 4
    import datasets

    rows = datasets.load_dataset(str(tmp_path / "out"), split="train").to_list()
    assert [(r["source_index"], r["chosen"], r["rejected"]) for r in rows] == [
        (0, " fine 0", " fine 0"), (2, " fine 2", " fine 2"), (3, " fine 0", " fine 0")
    ]
    card = (result.output / "README.md").read_text()
    assert "| examples dropped after 3 retries | 1 |" in card


def test_output_folder_is_a_hub_dataset_repo(tmp_path, fake_generator):
    import datasets
    from huggingface_hub import DatasetCard

    out = tmp_path / "out"
    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 10)), output=str(out), test_size=0.2)
    build(config, generator=fake_generator(), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data", "images", "rlcd_build.yaml"]
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
    ]
    loaded = datasets.load_dataset(str(out))
    assert {k: len(v) for k, v in loaded.items()} == {"train": 8, "test": 2}
    assert loaded["train"].features["descriptor_index"].dtype == "int32"
    assert sorted(list(loaded["train"]["source_index"]) + list(loaded["test"]["source_index"])) == list(range(10))

    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "mit"
    assert {"rlcd", "synthetic", "preference"} <= set(card.data.tags)
    assert card.data.size_categories == ["n<1K"]
    assert card.data.configs == [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": "data/train-*"}, {"split": "test", "path": "data/test-*"}],
        }
    ]
    info = card.data.dataset_info
    assert {s["name"]: s["num_examples"] for s in info["splits"]} == {"train": 8, "test": 2}
    assert all(s["num_bytes"] > 0 for s in info["splits"])
    assert info["download_size"] == sum(p.stat().st_size for p in (out / "data").iterdir())
    text = card.text
    for needed in ("harmless, helpful response", "arxiv.org/abs/2307.12950", "load_dataset", "RewardTrainer", "@inproceedings",
                   "rlcd-data build --config rlcd_build.yaml", "template version 1", "temperature 1.0",
                   "Prompt format `text`",
                   "no token containing `` \\ `` or `` ` `` sampled"):
        assert needed in text, needed

    saved = read_config_file(out / "rlcd_build.yaml")
    # `overwrite` is not saved (it defaults to False as here); the format is saved as resolved (a fake
    # generator has no chat template: text, the paper's temperature).
    assert BuildConfig(**saved) == config.with_prompt_format("text")
    assert (saved["prompt_format"], saved["temperature"]) == ("text", 1.0)
    assert "overwrite" not in yaml.safe_load((out / "rlcd_build.yaml").read_text())


def test_conversational_format(tmp_path, fake_generator):
    import datasets

    config = BuildConfig(
        task="harmless", prompts=str(prompts_file(tmp_path, 2)), output=str(tmp_path / "out"), format="conversational"
    )
    build(config, generator=fake_generator(), progress=False)
    row = datasets.load_dataset(str(tmp_path / "out"), split="train")[0]
    assert row["prompt"] == [{"role": "user", "content": "Question number 0?"}]
    assert row["chosen"] == [{"role": "assistant", "content": row["positive_descriptor"]}]
    assert row["rejected"] == [{"role": "assistant", "content": row["negative_descriptor"]}]


def test_existing_output_is_refused_and_untouched(tmp_path, fake_generator):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(out))
    generator = fake_generator()
    with pytest.raises(RlcdError, match="exists and is not empty"):
        build(config, generator=generator, progress=False)
    assert generator.requests == [] and [p.name for p in out.iterdir()] == ["precious.txt"]


def test_overwrite_replaces_data_and_keeps_other_files(tmp_path, fake_generator):
    out = tmp_path / "out"
    build(BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 5)), output=str(out), test_size=2),
          generator=fake_generator(), progress=False)
    (out / "notes.txt").write_text("mine")
    build(BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 3)), output=str(out)),
          RunOptions(overwrite=True), generator=fake_generator(), progress=False)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00001.parquet"]
    assert (out / "notes.txt").read_text() == "mine"


def test_interrupted_build_keeps_completed_pairs(tmp_path, queue_generator):
    def respond(prompt, n):
        if "Question number 4?" in prompt:
            raise KeyboardInterrupt
        return "ok", True

    out = tmp_path / "out"
    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 6)), output=str(out), batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        build(config, generator=queue_generator(respond), progress=False)
    parts = sorted((out / ".rlcd-build").glob("part-*.jsonl"))
    saved = [json.loads(line) for part in parts for line in part.read_text().splitlines()]
    assert [r["source_index"] for r in saved] == [0, 1, 2, 3]
    assert not list((out / ".rlcd-build").glob("*.tmp"))


def test_bad_config_values():
    with pytest.raises(RlcdError, match="unknown quantization '3bit'"):
        BuildConfig(task="harmless", quantization="3bit")
    with pytest.raises(RlcdError, match="batch_size must be at least 1"):
        BuildConfig(task="harmless", batch_size=0)
    with pytest.raises(RlcdError, match="test_size"):
        BuildConfig(task="harmless", test_size=2.5)
    assert BuildConfig(task="harmless").output == "rlcd-harmless"
    a, b = BuildConfig(task="harmless"), BuildConfig(task="harmless", batch_size=64, output="elsewhere")
    assert a.output_fields() == b.output_fields() != BuildConfig(task="harmless", seed=1).output_fields()


def test_progress_counts_pairs_as_they_finish_within_a_call(tmp_path, fake_generator, capsys):
    class OneAtATime(fake_generator):
        def generate(self, prompts, seeds, settings, on_progress=None):
            completions = super().generate(prompts, seeds, settings)  # no progress from the parent
            for i, completion in enumerate(completions):
                on_progress([(i, completion)], completion.num_tokens)
            return completions

    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 3)), output=str(tmp_path / "out"))
    build(config, generator=OneAtATime(), progress=True)
    err = capsys.readouterr().err
    # All 3 pairs go to the generator in one call; the bar still moves pair by pair.
    assert "1/3" in err and "2/3" in err and "3/3" in err and "tok/s" in err


def test_no_pairs_is_a_clear_error_and_keeps_an_existing_dataset(tmp_path, fake_generator):
    out = tmp_path / "out"
    build(BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 2)), output=str(out)),
          generator=fake_generator(), progress=False)
    before = (out / "data" / "train-00000-of-00001.parquet").read_bytes()
    never_ends = fake_generator(lambda prompt, n: ("rambling", False))
    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 2)), output=str(out), max_retries=1)
    with pytest.raises(RlcdError, match="no pairs: all 2 examples failed after 1 retries"):
        build(config, RunOptions(overwrite=True), generator=never_ends, progress=False)
    assert (out / "data" / "train-00000-of-00001.parquet").read_bytes() == before


def test_progress_redraws_per_finished_pair_not_per_decoding_step(tmp_path, fake_generator, capsys):
    """A build writes its progress to a log file as often as the bar redraws: once per finished pair
    (or per second), never once per decoding step."""

    class ManySteps(fake_generator):
        def generate(self, prompts, seeds, settings, on_progress=None):
            completions = super().generate(prompts, seeds, settings)
            for i, completion in enumerate(completions):
                for _ in range(200):  # decoding steps in which nothing finishes
                    on_progress([], 1)
                on_progress([(i, completion)], completion.num_tokens)
            return completions

    config = BuildConfig(task="harmless", prompts=str(prompts_file(tmp_path, 3)), output=str(tmp_path / "out"))
    build(config, generator=ManySteps(), progress=True)
    redraws = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "harmless" in line]
    assert "3/3" in redraws[-1] and "tok/s" in redraws[-1]
    assert len(redraws) < 20  # 1200 decoding steps

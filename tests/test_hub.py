"""`rlcd-data push` end to end against a fake Hub on 127.0.0.1, with the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from fake_hub import FakeHub

from rlcd_data.errors import RlcdError
from rlcd_data.hub import push
from rlcd_data.pipeline.config import BuildConfig
from rlcd_data.pipeline.run import build

TOKEN = "hf_test_token_0123456789"


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub(TOKEN) as hub:
        yield hub


def built(tmp_path, fake_generator, n=6, name="out", test_size=0.0):
    prompts = tmp_path / f"{name}.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(n)))
    config = BuildConfig(task="harmless", prompts=str(prompts), output=str(tmp_path / name), test_size=test_size)
    build(config, generator=fake_generator(), progress=False)
    return tmp_path / name


def received_repo(hub, repo, tmp_path):
    folder = tmp_path / ("received-" + repo.replace("/", "-"))
    for path, data in hub.repos[repo].items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def card_yaml(hub, repo):
    return yaml.safe_load(hub.repos[repo]["README.md"].decode().split("---")[1])


def test_push_uploads_data_card_and_config_in_one_commit(hub, tmp_path, fake_generator):
    import datasets

    folder = built(tmp_path, fake_generator, test_size=2)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    result = push(folder, "alice/rlcd-harmless", token=TOKEN, endpoint=hub.endpoint, private=True)
    assert hub.commits == 1
    create = next(json.loads(body) for method, path, body in hub.requests if path == "/api/repos/create")
    assert create["visibility"] == "private" and create["type"] == "dataset"
    files = hub.repos["alice/rlcd-harmless"]
    assert sorted(files) == [
        "README.md", "data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet",
        "images/descriptors.png", "images/lengths.png", "rlcd_build.yaml",
    ]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", files["README.md"].decode())
    assert sorted(links) == ["images/descriptors.png", "images/lengths.png"]  # the card's plots resolve on the Hub
    assert files["images/lengths.png"] == (folder / "images/lengths.png").read_bytes()
    assert files["data/train-00000-of-00001.parquet"] == (folder / "data/train-00000-of-00001.parquet").read_bytes()
    assert files["rlcd_build.yaml"] == (folder / "rlcd_build.yaml").read_bytes()
    meta = card_yaml(hub, "alice/rlcd-harmless")
    assert meta["configs"][0]["data_files"] == [
        {"split": "train", "path": "data/train-*"}, {"split": "test", "path": "data/test-*"}
    ]
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == {"train": 4, "test": 2}
    assert 'load_dataset("alice/rlcd-harmless")' in files["README.md"].decode()
    assert result.url == f"{hub.endpoint}/datasets/alice/rlcd-harmless"
    assert result.commit_url.startswith(f"{hub.endpoint}/datasets/alice/rlcd-harmless/commit/")
    assert TOKEN.encode() not in hub.all_bytes_received()
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # local folder untouched
    loaded = datasets.load_dataset(str(received_repo(hub, "alice/rlcd-harmless", tmp_path)))
    assert {k: len(v) for k, v in loaded.items()} == {"train": 4, "test": 2}


def test_second_push_replaces_data_and_keeps_hand_made_metadata(hub, tmp_path, fake_generator):
    folder = built(tmp_path, fake_generator, test_size=2)
    push(folder, "alice/ds", token=TOKEN, endpoint=hub.endpoint)
    # The owner edits the card on the Hub: an extra tag and another licence.
    card = hub.repos["alice/ds"]["README.md"].decode()
    card = card.replace("license: mit", "license: cc-by-4.0").replace("- rlcd\n", "- rlcd\n- my-own-tag\n")
    hub.repos["alice/ds"]["README.md"] = card.encode()

    push(folder, "alice/ds", token=TOKEN, endpoint=hub.endpoint)  # same folder again: same files
    assert sorted(hub.repos["alice/ds"]) == [
        "README.md", "data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet",
        "images/descriptors.png", "images/lengths.png", "rlcd_build.yaml",
    ]
    smaller = built(tmp_path, fake_generator, n=3, name="new")  # a new build without a test split
    (smaller / "images" / "descriptors.png").unlink()  # ... and with one plot fewer
    push(smaller, "alice/ds", token=TOKEN, endpoint=hub.endpoint)
    assert sorted(hub.repos["alice/ds"]) == [
        "README.md", "data/train-00000-of-00001.parquet", "images/lengths.png", "rlcd_build.yaml"
    ]
    meta = card_yaml(hub, "alice/ds")
    assert meta["license"] == "cc-by-4.0" and "my-own-tag" in meta["tags"] and "rlcd" in meta["tags"]
    assert [s["name"] for s in meta["dataset_info"]["splits"]] == ["train"]
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"}]


def test_push_uploads_peoples_judgments_with_the_card_and_a_new_build_replaces_them(hub, tmp_path, fake_generator):
    from rlcd_data.quality.report import inspect_dataset
    from rlcd_data.view.pairs import PairTable

    folder = built(tmp_path, fake_generator)
    table = PairTable(str(folder))
    for row in table.sample(4, 0):
        table.judge("ann", 0, 4, row, "left")
    inspect_dataset(str(folder), write_card=True)  # the card's quality section gains the human agreement
    push(folder, "alice/judged", token=TOKEN, endpoint=hub.endpoint)
    files = hub.repos["alice/judged"]
    assert files["annotations/ann.jsonl"] == (folder / "annotations" / "ann.jsonl").read_bytes()
    assert "| human agreement (people prefer chosen" in files["README.md"].decode()
    push(built(tmp_path, fake_generator, name="rebuilt"), "alice/judged", token=TOKEN, endpoint=hub.endpoint)
    assert not any(path.startswith("annotations/") for path in hub.repos["alice/judged"])


def test_push_to_a_branch_leaves_main_alone(hub, tmp_path, fake_generator):
    folder = built(tmp_path, fake_generator)
    push(folder, "alice/ds", token=TOKEN, endpoint=hub.endpoint)
    main_before = dict(hub.repos["alice/ds"])
    smaller = built(tmp_path, fake_generator, n=2, name="new")
    result = push(smaller, "alice/ds", token=TOKEN, endpoint=hub.endpoint, revision="v2", commit_message="Second build")
    assert hub.repos["alice/ds"] == main_before
    assert card_yaml(hub, "alice/ds@v2")["dataset_info"]["splits"][0]["num_examples"] == 2
    assert "/commit/" in result.commit_url
    commit = next(body for method, path, body in hub.requests if "/commit/v2" in path)
    assert json.loads(commit.decode().splitlines()[0])["value"]["summary"] == "Second build"


def test_server_error_then_retry_completes(hub, tmp_path, fake_generator):
    folder = built(tmp_path, fake_generator)
    hub.fail_next_commits = 10  # more than the client's own retries
    with pytest.raises(RlcdError, match="push failed .*run the same push again"):
        push(folder, "alice/ds", token=TOKEN, endpoint=hub.endpoint)
    assert "README.md" not in hub.repos.get("alice/ds", {})
    hub.fail_next_commits = 0
    push(folder, "alice/ds", token=TOKEN, endpoint=hub.endpoint)
    assert "data/train-00000-of-00001.parquet" in hub.repos["alice/ds"]


def test_token_rejected_missing_and_offline(hub, tmp_path, fake_generator, monkeypatch):
    folder = built(tmp_path, fake_generator)
    with pytest.raises(RlcdError, match=r"rejected the token \(401\): pass --token, set HF_TOKEN") as e:
        push(folder, "alice/ds", token="hf_wrong_secret", endpoint=hub.endpoint)
    assert "hf_wrong_secret" not in str(e.value)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(RlcdError, match="no Hugging Face token"):
        push(folder, "alice/ds", endpoint=hub.endpoint)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RlcdError, match="HF_HUB_OFFLINE is set"):
        push(folder, "alice/ds", token=TOKEN, endpoint=hub.endpoint)


def test_not_a_build_folder(hub, tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(RlcdError, match="not a folder written by `rlcd-data build`"):
        push(tmp_path / "x", "alice/ds", token=TOKEN)


def test_cli_push_with_hf_token_from_environment(hub, tmp_path, fake_generator):
    folder = built(tmp_path, fake_generator)
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "rlcd_data", "push", str(folder), "--repo-id", "bob/rlcd"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"{hub.endpoint}/datasets/bob/rlcd" in result.stdout
    assert 'load_dataset("bob/rlcd")' in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    assert "data/train-00000-of-00001.parquet" in hub.repos["bob/rlcd"]
    env["HF_TOKEN"] = "hf_bad"
    result = subprocess.run(
        [sys.executable, "-m", "rlcd_data", "push", str(folder), "--repo-id", "bob/rlcd"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "rejected the token" in result.stderr


def test_build_push_to_hub(hub, tmp_path, tiny_model_dir):
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "rlcd_data", "build", "helpful", "--model", str(tiny_model_dir), "--limit", "2",
         "--max-new-tokens", "40", "--output", str(tmp_path / "out"), "--push-to-hub", "bob/helpful",
         "--backend", "transformers"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote " in result.stdout and f"{hub.endpoint}/datasets/bob/helpful" in result.stdout
    assert hub.repos["bob/helpful"]["data/train-00000-of-00001.parquet"] == (
        tmp_path / "out" / "data" / "train-00000-of-00001.parquet"
    ).read_bytes()

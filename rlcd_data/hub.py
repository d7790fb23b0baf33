"""Publishing a built folder to the Hugging Face Hub in one commit, merging the card with what is there."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import RlcdError
from .pipeline.config import CONFIG_FILENAME, read_config_file
from .quality.annotations import ANNOTATIONS
from .quality.plots import IMAGES

LOGIN_HINT = "pass --token, set HF_TOKEN, or log in with `hf auth login`"
# Card metadata the build computes; everything else an owner put on the Hub card survives a push.
OWNED_BY_BUILD = ("configs", "dataset_info", "size_categories", "pretty_name", "task_categories", "language")


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str
    commit_url: str
    files: list[str]

    def load_line(self) -> str:
        return f'datasets.load_dataset("{self.repo_id}")'


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload a folder written by `build` (data, card, its plots, build config) to a Hub dataset repo in one commit.

    The repo is created if missing. Files the repo has under ``data/``,
    ``images/`` or ``annotations/`` that the folder does not are deleted in the same commit, so a new build
    replaces the old one (judgments of the old rows included). The card's ``configs``/``dataset_info`` come from
    the build; other metadata already on the Hub card (extra tags, a licence
    set by hand) is kept.

    Raises:
        RlcdError: offline mode, not a build folder, no or rejected token,
            network or server failure (the local folder is never modified,
            and running the same push again completes it).

    ``endpoint`` defaults to ``HF_ENDPOINT`` (the public Hub).
    """
    folder = Path(folder)
    files = _build_files(folder)
    token = check_can_push(token)
    try:
        return _push(folder, files, repo_id, private, revision, commit_message, token, endpoint)
    except RlcdError:
        raise
    except Exception as e:  # HTTP, network and validation errors from huggingface_hub/httpx
        raise RlcdError(_describe(e, token)) from None


def check_can_push(token: str | None = None) -> str:
    """The token a push would use; RlcdError now if a push could not even start (offline, no token)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise RlcdError("cannot push: HF_HUB_OFFLINE is set (unset it to publish)")
    return _resolve_token(token)


def _build_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise RlcdError(f"{folder}: no such folder")
    missing = [name for name in ("README.md", CONFIG_FILENAME, "data") if not (folder / name).exists()]
    if missing:
        raise RlcdError(f"{folder}: not a folder written by `rlcd-data build` (missing {', '.join(missing)})")
    data = sorted((folder / "data").glob("*.parquet"))
    if not data:
        raise RlcdError(f"{folder}/data: no Parquet files")
    # the card's plots, and people's judgments of these rows (`rlcd-data view`) behind its human agreement
    return data + sorted((folder / IMAGES).glob("*.png")) + sorted((folder / ANNOTATIONS).glob("*.jsonl"))


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise RlcdError(f"no Hugging Face token: {LOGIN_HINT}")
    return token


def _describe(error: Exception, token: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(error, "response", None), "status_code", None)
    first_line = (str(error).splitlines() or [type(error).__name__])[0].replace(token, "***")
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return f"the Hub rejected the token ({status}): {LOGIN_HINT}"
    return (
        f"push failed ({type(error).__name__}: {first_line}); the local folder is unchanged, "
        "run the same push again to complete it"
    )


def _push(folder, files, repo_id, private, revision, commit_message, token, endpoint) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, repo_type="dataset", private=private or None, exist_ok=True)
    if revision:
        api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
    existing = set(api.list_repo_files(repo_id, repo_type="dataset", revision=revision))
    card = _merged_card(api, folder, repo_id, revision, "README.md" in existing)
    new_paths = {p.relative_to(folder).as_posix() for p in files}
    operations = [CommitOperationAdd(path, str(folder / path)) for path in sorted(new_paths)]
    operations.append(CommitOperationAdd(CONFIG_FILENAME, str(folder / CONFIG_FILENAME)))
    operations.append(CommitOperationAdd("README.md", str(card).encode()))
    operations += [
        CommitOperationDelete(path) for path in sorted(existing)
        if path.startswith(("data/", f"{IMAGES}/", f"{ANNOTATIONS}/")) and path not in new_paths
    ]
    commit = api.create_commit(
        repo_id,
        repo_type="dataset",
        operations=operations,
        commit_message=commit_message or f"Upload RLCD dataset built by rlcd-data ({folder.name})",
        revision=revision,
    )
    url = getattr(repo_url, "url", None) or f"{api.endpoint}/datasets/{repo_id}"
    return PushResult(repo_id, str(url), commit.commit_url, sorted(op.path_in_repo for op in operations))


def _merged_card(api, folder: Path, repo_id: str, revision: str | None, has_card: bool):
    """The local card with `load_dataset` pointing at the repo, merged with the card already on the Hub."""
    from huggingface_hub import DatasetCard

    card = DatasetCard((folder / "README.md").read_text())
    built_at = read_config_file(folder / CONFIG_FILENAME).get("output")
    if built_at:
        card.text = card.text.replace(f'load_dataset("{built_at}"', f'load_dataset("{repo_id}"')
    if not has_card:
        return card
    path = api.hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=revision)
    remote = DatasetCard.load(path).data.to_dict()
    ours = card.data.to_dict()
    merged = {**remote, **{k: v for k, v in ours.items() if k in OWNED_BY_BUILD or k not in remote}}
    merged["tags"] = list(dict.fromkeys((remote.get("tags") or []) + (ours.get("tags") or [])))
    from huggingface_hub import DatasetCardData

    return DatasetCard(f"---\n{DatasetCardData(**merged).to_yaml()}\n---\n{card.text}")

"""Finding tasks by name: the built-in task folders and a user's own, user tasks first."""

from __future__ import annotations

from pathlib import Path

from ..errors import RlcdError
from ..resources import resource_dir
from .folder import load_task_folder
from .task import Task


def _template_roots(templates_dir: str | Path | None) -> list[Path]:
    roots = []
    if templates_dir is not None:
        root = Path(templates_dir)
        if not root.is_dir():
            raise RlcdError(f"{root}: templates folder not found")
        roots.append(root)
    roots.append(resource_dir("templates"))
    return roots


def list_tasks(templates_dir: str | Path | None = None) -> dict[str, Path]:
    """Task name -> folder; user tasks override built-in ones of the same name."""
    found: dict[str, Path] = {}
    for root in reversed(_template_roots(templates_dir)):
        for folder in sorted(root.iterdir()):
            if (folder / "task.yaml").is_file():
                found[folder.name] = folder
    return dict(sorted(found.items()))


def load_task(name: str, templates_dir: str | Path | None = None) -> Task:
    """Load and check a task by name.

    Raises:
        RlcdError: unknown task, a malformed task.yaml, a missing template, a
            template syntax error, or a template using a variable its task
            does not provide (all misspelt names are listed at once).
    """
    tasks = list_tasks(templates_dir)
    if name not in tasks:
        raise RlcdError(f"unknown task {name!r} (available: {', '.join(tasks) or 'none'})")
    return load_task_folder(tasks[name])

"""`rlcd-data ls`: list the tasks."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("ls", help="List the tasks (built-in and, with --templates, your own).")
    parser.add_argument("--templates", help="Folder of user task folders.")


def run(args) -> int:
    from ..tasks.catalog import list_tasks
    from ..tasks.folder import load_task_folder

    for name, folder in list_tasks(args.templates).items():
        task = load_task_folder(folder)
        print(f"{name:<12} v{task.version}  {len(task.descriptors):>2} descriptor pair(s)  {task.description}")
    return 0

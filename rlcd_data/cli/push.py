"""`rlcd-data push DIR --repo-id NAMESPACE/NAME`: publish a built folder to the Hub."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("push", help="Publish a folder written by `build` to a Hugging Face Hub dataset repo.")
    parser.add_argument("folder", metavar="DIR", help="Folder written by `rlcd-data build`.")
    add_push_arguments(parser, repo_flag="--repo-id", required=True)
    parser.add_argument("--revision", help="Branch to push to (created if missing). Default: main.")
    parser.add_argument("--commit-message", help="Commit message.")


def add_push_arguments(parser, repo_flag: str, required: bool) -> None:
    parser.add_argument(repo_flag, dest="repo_id", metavar="NAMESPACE/NAME", required=required,
                        help="Dataset repo on the Hub (created if missing).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--token", help="Hub token (default: $HF_TOKEN, then the saved login).")


def run(args) -> int:
    from ..hub import push

    result = push(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        token=args.token,
    )
    report(result)
    return 0


def report(result) -> None:
    print(f"pushed {len(result.files)} files to {result.url}")
    print(f"load it with: {result.load_line()}")

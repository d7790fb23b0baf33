"""`rlcd-data view SOURCE`: browse a pair dataset and spot-check it blind, on a local web page."""

from __future__ import annotations

from ..view.serve import DEFAULT_PORT


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "view",
        help="A local web page to browse a pair dataset and label a blind sample (human agreement in the card).",
    )
    parser.add_argument("source", metavar="SOURCE",
                        help="Pair dataset: a folder `build` wrote, a `datasets` folder, a .jsonl file, a cached "
                             "Hub dataset.")
    parser.add_argument("--split", default="train", help="Split of a dataset folder or Hub dataset.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"Port (default {DEFAULT_PORT}; 0: any free one).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on (default 127.0.0.1). Any other address needs a token: one is made, "
                             "printed once in the URL, and never written anywhere.")
    parser.add_argument("--annotations", metavar="DIR",
                        help="Folder for the judgments (annotations/<name>.jsonl); default: SOURCE when it is a "
                             "folder. A file or Hub source needs one.")
    parser.add_argument("--open", action="store_true", help="Open the page in the default browser.")


def run(args) -> int:
    from ..view.pairs import PairTable
    from ..view.serve import is_loopback, new_token, serve

    table = PairTable(args.source, args.split, annotations_dir=args.annotations)
    token = None if is_loopback(args.host) else new_token()

    def ready(url: str) -> None:
        print(f"rlcd-data view: {len(table)} pairs of {args.source} at {url}", flush=True)
        print(f"judgments go to {table.folder / 'annotations'}/; Ctrl-C stops the server", flush=True)

    try:
        serve(table, host=args.host, port=args.port, token=token, open_browser=args.open, on_ready=ready)
    except KeyboardInterrupt:  # Ctrl-C is how a server stops: not an error
        pass
    return 0

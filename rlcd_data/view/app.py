"""The page's server: Starlette routes that call `PairTable` and the quality report, nothing else.

The only write is a judgment (``POST /api/judge``); no route takes a path from a request (plots are served by
their index in a list made at start). On a loopback address only requests for that address are served (a page
elsewhere cannot reach it by DNS rebinding); on any other address every request needs the session's token.
"""

from __future__ import annotations

import secrets
import sys
import threading
from pathlib import Path

from ..errors import RlcdError
from ..quality.annotations import NotSaved
from .pairs import MAX_PAGE_ROWS, PAGE_ROWS, Filters, PairTable

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "rlcd_view_token"
MAX_SAMPLE = 10_000


class Report:
    """The rows' flags, then the quality report of the table, computed once in the background (a large
    dataset's take a while: 100k HH pairs about a minute)."""

    def __init__(self, table: PairTable):
        self.result: dict | None = None
        self.error: str | None = None
        threading.Thread(target=self._compute, args=(table,), daemon=True).start()

    def _compute(self, table: PairTable) -> None:
        from ..quality import measures
        from ..quality.report import verdicts

        try:
            table.flags()
            result = measures.report(table.data, similar=table.similar)
            result["verdicts"] = verdicts(result)
            self.result = result
        except Exception as e:  # shown on the page instead of figures; the rest of the page works
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def create_app(table: PairTable, *, token: str | None = None, loopback_hosts: tuple[str, ...] | None = None):
    """The Starlette application for ``table``.

    Args:
        token: every request must carry it (``?token=`` once, then a cookie); None: no token (loopback only).
        loopback_hosts: the Host headers served (e.g. ``("127.0.0.1", "localhost")``); None: any.
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    report = Report(table)
    plots = sorted((table.folder / "images").glob("*.png")) if (table.folder / "images").is_dir() else []

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def index(request):
        response = FileResponse(STATIC / "index.html")
        if token and request.query_params.get("token") == token:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    async def info(request):
        agreement = table.agreement()
        return JSONResponse({
            "source": str(table.source), "rows": len(table), "unit": table.data.unit, "question": table.question,
            "descriptors": table.descriptors(), "soft_labels": table.data.probabilities is not None,
            "report": _headline(report.result) if report.result else None, "report_error": report.error,
            "plots": [p.name for p in plots], "agreement": agreement,
        })

    async def rows(request):
        try:
            q = request.query_params
            offset = max(0, int(q.get("offset", 0)))
            limit = min(MAX_PAGE_ROWS, max(1, int(q.get("limit", PAGE_ROWS))))
            filters = Filters(
                query=q.get("q", ""), descriptor=_opt(q, "descriptor", int), label_min=_opt(q, "label_min", float),
                label_max=_opt(q, "label_max", float), length_min=_opt(q, "length_min", int),
                length_max=_opt(q, "length_max", int), flagged=q.get("flagged") in ("1", "true"),
            )
        except ValueError as e:
            return error(f"bad query: {e}")
        matching = table.matching(filters)
        return JSONResponse({"total": len(matching), "offset": offset,
                             "rows": [table.row(i) for i in matching[offset:offset + limit]]})

    async def plot(request):
        index_ = request.path_params["index"]
        if not 0 <= index_ < len(plots):
            return error("no such plot", 404)
        return FileResponse(plots[index_], media_type="image/png")

    async def spot(request):
        try:
            seed, size = int(request.query_params["seed"]), int(request.query_params["size"])
            annotator = request.query_params.get("annotator", "")
            if not 1 <= size <= MAX_SAMPLE:
                raise ValueError(f"size must be 1 to {MAX_SAMPLE}")
            done = _judged(table, annotator, seed) if annotator else {}
        except (KeyError, ValueError, RlcdError) as e:
            return error(f"bad spot-check: {e}")
        rows_ = table.sample(size, seed)
        return JSONResponse({"question": table.question, "seed": seed, "size": size,
                             "items": [table.blind_item(seed, r) for r in rows_],
                             "judged": {str(r): done[r] for r in rows_ if r in done}})

    async def judge(request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error("send the judgment as application/json", 415)
        try:
            body = await request.json()
            fields = {k: body[k] for k in ("annotator", "seed", "size", "row", "choice")}
            for k in ("seed", "size", "row"):
                if type(fields[k]) is not int:
                    raise ValueError(f"{k} must be an integer")
        except (KeyError, ValueError, TypeError) as e:
            return error(f"bad judgment: {e}")
        try:
            table.judge(**fields)
        except NotSaved as e:  # the person's problem and the terminal's: one line on both
            print(f"rlcd-data view: error: {e}", file=sys.stderr, flush=True)
            return error(str(e), 507)
        except RlcdError as e:
            return error(str(e))
        return JSONResponse({"saved": True})

    async def agreement(request):
        return JSONResponse(table.agreement())

    middleware = []
    if loopback_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(loopback_hosts)))
    if token:
        middleware.append(Middleware(TokenMiddleware, token=token))
    return Starlette(routes=[
        Route("/", index), Route("/api/info", info), Route("/api/rows", rows),
        Route("/api/plot/{index:int}", plot), Route("/api/spot", spot), Route("/api/judge", judge, methods=["POST"]),
        Route("/api/agreement", agreement), Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], middleware=middleware)


class TokenMiddleware:
    """Every request carries the token: as ``?token=`` (the URL printed at start), or the cookie the page sets."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse

        if scope["type"] == "http":
            request = Request(scope)
            given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                await PlainTextResponse("a token is needed: open the URL rlcd-data view printed", 403)(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def _opt(params, name: str, kind):
    value = params.get(name, "")
    return kind(value) if value != "" else None


def _judged(table: PairTable, annotator: str, seed: int) -> dict[int, str]:
    """The rows this annotator has judged in sample ``seed``, with their choices (a returning person continues)."""
    from ..quality import annotations

    annotations.annotator_file(table.folder, annotator)  # the name is checked before anything is read
    rows = annotations.read(table.folder, table.split).get(annotator, {})
    return {row: j.choice for row, j in rows.items() if j.seed == seed}


def _headline(result: dict) -> dict:
    """The report's figures the first page shows."""
    shape, lengths, sep = result["shape"], result["lengths"], result.get("lexical_separability")
    soft = result.get("soft_labels")
    return {
        "pairs": result["pairs"], "identical": shape["identical"], "near_identical": shape["near_identical"],
        "lexical_separability": sep and {"accuracy": sep["accuracy"], "ci95": sep["ci95"]},
        "longer_is_chosen": lengths["longer_is_chosen_accuracy"], "length_unit": lengths["unit"],
        "soft_label_mean": soft and soft["mean"], "verdicts": result["verdicts"],
    }

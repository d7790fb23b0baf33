"""A model behind an OpenAI-compatible server (`vllm serve`, SGLang, TGI, llama.cpp, a hosted API), reached with
the official `openai` client: the connection, its checks, bounded concurrency, pacing, retries and errors.

The client retries 429, 5xx, timeouts and dropped connections with exponential backoff and honours
``Retry-After`` (``max_retries`` times); a response that is not the JSON it should be is retried here the
same number of times. Every HTTP attempt is counted, so the progress line can show the retries. The API
key comes from an environment variable and is never written anywhere; the URL shown in errors and records
has no user-info and no query string.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ..errors import RlcdError

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
RESUME_HINT = "completed pairs are kept: start the server and continue with --resume"


def public_url(url: str) -> str:
    """``url`` without user-info (``user:password@``), query string or fragment: safe to show and record."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


class Server:
    """A model on an OpenAI-compatible server, checked at opening.

    Args:
        base_url: the server's API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name (what ``/v1/models`` lists).
        api_key_env: the environment variable holding the API key (a server without one accepts any).
        api: the API prompts go to: completions (prompt strings) or chat (chat messages).
        max_concurrency: requests in flight at most.
        request_rate: requests started per second at most (None: no limit).
        timeout: seconds a request may take before it is retried.
        max_retries: retries of a failed request (with backoff) before the build stops.

    Raises:
        RlcdError: the server cannot be reached, refuses the key, or does not serve ``model``.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = DEFAULT_API_KEY_ENV, api: str = "completions",
                 max_concurrency: int = 64, request_rate: float | None = None, timeout: float = 600.0,
                 max_retries: int = 5):
        import openai

        if urlsplit(base_url).scheme not in ("http", "https"):
            raise RlcdError(f"--base-url {public_url(base_url)!r}: give an http:// or https:// URL")
        self.url, self.model, self.api_key_env, self.api = public_url(base_url), model, api_key_env, api
        self.max_retries, self.request_rate = max_retries, request_rate
        self.attempts = 0  # HTTP requests sent, retries included
        self.requests = 0  # requests asked for
        self.in_flight = 0
        self._next_start = 0.0
        self.loop = asyncio.new_event_loop()
        self._limit = asyncio.Semaphore(max_concurrency)
        self._pace_lock = asyncio.Lock()

        async def count(request) -> None:
            self.attempts += 1

        http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [count]})
        parts = urlsplit(base_url)  # a query string (e.g. an api-version) goes with every request
        self.client = openai.AsyncOpenAI(base_url=urlunsplit(parts._replace(query="", fragment="")),
                                         default_query=dict(parse_qsl(parts.query)) or None,
                                         api_key=os.environ.get(api_key_env) or "none", max_retries=max_retries,
                                         timeout=timeout, http_client=http)
        try:
            self.kind = self.run(self._check())
        except BaseException:
            self.close()
            raise

    @property
    def retried(self) -> int:
        return max(self.attempts - self.requests, 0)

    def run(self, coroutine: Awaitable) -> Any:
        """Run ``coroutine`` on this server's event loop; client errors become one-line `RlcdError`s."""
        try:
            return self.loop.run_until_complete(coroutine)
        except Exception as e:
            raise self.error(e) from None

    def gather(self, coroutines) -> list:
        """The results of ``coroutines``, run concurrently (within the limits) on this server's loop."""
        async def all_of():
            return await asyncio.gather(*coroutines)

        return self.run(all_of())

    def close(self) -> None:
        """Cancel what is in flight (after an interrupt) and close the connections."""
        if self.loop.is_closed():
            return
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.wait(pending))
        self.loop.run_until_complete(self.client.close())
        self.loop.close()

    async def _check(self) -> str:
        """The server's kind ("vllm" or "openai-compatible"), once it answers and serves the model."""
        self.requests += 1
        # one retry only: a server that is not there should fail the command now, not after the backoff
        served = [m async for m in self.client.with_options(max_retries=1).models.list()]
        names = [m.id for m in served]
        if self.model not in names:
            raise RlcdError(f"the server at {self.url} does not serve model {self.model!r} "
                            f"(it serves: {', '.join(names) or 'none'}); pass one of them as --model")
        owner = next(getattr(m, "owned_by", "") for m in served if m.id == self.model)
        return "vllm" if owner == "vllm" else "openai-compatible"

    async def request(self, call: Callable[[], Awaitable[Any]], valid: Callable[[Any], bool]) -> Any:
        """``await call()`` within the concurrency limit and the request rate; a response that ``valid``
        rejects (or that is not JSON) is retried like a failed request."""
        import openai

        self.requests += 1
        async with self._limit:
            self.in_flight += 1
            try:
                for attempt in range(self.max_retries + 1):
                    await self._pace()
                    try:
                        response = await call()
                    except (ValueError, openai.APIResponseValidationError) as e:  # not JSON, or not its shape
                        problem = e
                    else:
                        if valid(response):
                            return response
                        problem = ValueError("a response without the expected fields")
                    if attempt == self.max_retries:
                        raise RlcdError(f"the server at {self.url} sent malformed responses "
                                        f"{self.max_retries + 1} times ({problem}); {RESUME_HINT}")
                    await asyncio.sleep(min(0.5 * 2**attempt, 8.0))
            finally:
                self.in_flight -= 1

    async def _pace(self) -> None:
        if not self.request_rate:
            return
        async with self._pace_lock:
            now = time.monotonic()
            wait = self._next_start - now
            self._next_start = max(now, self._next_start) + 1 / self.request_rate
        if wait > 0:
            await asyncio.sleep(wait)

    def error(self, e: Exception) -> Exception:
        """A one-line `RlcdError` for a client error (others pass through). Never includes the key."""
        import openai

        if isinstance(e, RlcdError):
            return e
        if isinstance(e, openai.APITimeoutError):
            return RlcdError(f"the server at {self.url} did not answer in time, {self.max_retries} retries included; "
                             f"{RESUME_HINT}")
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e.__context__
            why = str(cause).splitlines()[0] if cause and str(cause) else "no connection"
            return RlcdError(f"cannot reach the server at {self.url} ({why}), retries included; {RESUME_HINT}")
        if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
            where = f"${self.api_key_env} is not set" if not os.environ.get(self.api_key_env) else \
                f"the key in ${self.api_key_env} was refused"
            return RlcdError(f"the server at {self.url} answered HTTP {e.status_code}: {where} "
                             "(--api-key-env names another variable)")
        if isinstance(e, openai.NotFoundError) and str(e.request.url.path).endswith("/chat/completions"):
            return RlcdError(f"the server at {self.url} has no chat completions API (HTTP 404 on /chat/completions): "
                             "send the rendered prompts to its completions API instead (--server-api completions)")
        if isinstance(e, openai.NotFoundError) and str(e.request.url.path).endswith("/completions"):
            return RlcdError(f"the server at {self.url} has no completions API (HTTP 404 on /completions): send the "
                             "chat format's messages to its chat completions API instead (--server-api chat)")
        if isinstance(e, openai.APIStatusError):
            detail = _first_line(e)
            return RlcdError(f"the server at {self.url} answered HTTP {e.status_code}"
                             f"{': ' + detail if detail else ''}; {RESUME_HINT}")
        return e


def _first_line(e) -> str:
    """The server's own message of an error response, on one line, without echoing the request."""
    body = getattr(e, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    if message is None and isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
    return " ".join(str(message).split())[:300] if message else ""

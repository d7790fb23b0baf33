"""A fault-injecting OpenAI-compatible server on 127.0.0.1, for what a real server rarely does on demand.

Completions are a function of (prompt, seed) alone, so a build's rows do not depend on which requests
failed or in which order they finished. ``faults`` is a queue: each completions request takes the next
fault, if any: "429" (with Retry-After), "500", "hang" (past the client's timeout), "malformed" (a 200 whose
body is not JSON), "401", "drop" (the connection closes without an answer); "hang" lasts 5 s. Both the
completions and the chat completions API are served, except by kind "chat-only" and "completions-only". ``down_after`` stops answering
(connections refused) once that many completions have been served.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


def reply(prompt: str, seed: int, backticks: bool = False) -> str:
    """The completion of (prompt, seed); with ``backticks``, one seed in three writes a banned character."""
    digest = hashlib.sha256(f"{prompt}\0{seed}".encode()).hexdigest()
    if backticks and int(digest[-2:], 16) % 3 == 0:
        return f" Reply `{digest[:10]}` with care."
    return f" Reply {digest[:10]} with care."


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that closes its connection (after an error, a timeout, a kill) is no server error


class FakeServer:
    def __init__(self, model: str = "served-model", kind: str = "vllm", api_key: str | None = None,
                 logprobs: bool = True, option_tokens: dict[str, int] | None = None, delay: float = 0.0,
                 backticks: bool = False):
        self.model, self.kind, self.api_key, self.logprobs = model, kind, api_key, logprobs
        self.delay, self.backticks = delay, backticks
        self.active = self.max_active = 0  # completions being answered now, and at most
        self.option_tokens = option_tokens or {}  # token text -> id, for generic servers' top_logprobs keys
        self.faults: list[str] = []
        self.down_after: int | None = None
        self.completions: list[dict] = []  # every completions request body that was answered
        self.arrivals: list[float] = []  # when each completions request arrived (time.monotonic)
        self.served = 0
        self.lock = threading.Lock()
        self.httpd = _Quiet(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: object, headers: dict | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._send(401, {"error": {"message": "Incorrect API key provided", "code": 401}})
                    return False
                return True

            def do_GET(self):
                if not self._authorised():
                    return
                if urlsplit(self.path).path.rstrip("/").endswith("/models"):
                    owner = "vllm" if server.kind == "vllm" else "system"
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model",
                                                                  "owned_by": owner}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                server.arrivals.append(time.monotonic())
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self._authorised():
                    return
                path = urlsplit(self.path).path.rstrip("/")
                chat = path.endswith("/chat/completions")
                if not path.endswith("/completions") or (server.kind == "chat-only" and not chat) or \
                        (server.kind == "completions-only" and chat):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                with server.lock:
                    fault = server.faults.pop(0) if server.faults else None
                    if server.down_after is not None and server.served >= server.down_after:
                        fault = "down"
                if fault == "down":
                    self.close_connection = True
                    threading.Thread(target=server.stop, daemon=True).start()
                    return
                if fault == "429":
                    self._send(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "0.2"})
                    return
                if fault == "500":
                    self._send(500, {"error": {"message": "internal error"}})
                    return
                if fault == "401":
                    self._send(401, {"error": {"message": "Incorrect API key provided"}})
                    return
                if fault == "hang":
                    time.sleep(5)
                    self.close_connection = True
                    return
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "malformed":
                    self._send(200, b'{"id": "cmpl-1", "choices": [')
                    return
                with server.lock:
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                time.sleep(server.delay)
                answer = server.answer_chat(body) if chat else server.answer(body)
                with server.lock:
                    server.active -= 1
                self._send(200, answer)

        return Handler

    def answer(self, body: dict) -> dict:
        with self.lock:
            self.completions.append(body)
            self.served += 1
        prompt, seed = body["prompt"], body.get("seed", 0)
        if body.get("max_tokens") == 1 and body.get("logprobs") is not None:
            return self._label(body)
        text = reply(prompt, seed, self.backticks)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
        if self.kind == "vllm":
            choice["text"] = text + "\nHuman"  # include_stop_str_in_output
            choice["stop_reason"] = "\nHuman"
        tokens = len(text.split())
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": self.model, "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}}

    def answer_chat(self, body: dict) -> dict:
        """A chat completion: a function of (messages, seed), or the reply's first token's top log-probabilities
        (over the option tokens' texts, or A and B)."""
        with self.lock:
            self.completions.append(body)
            self.served += 1
        key, seed = json.dumps(body["messages"], ensure_ascii=False), body.get("seed", 0)
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        if body.get("max_tokens") == 1 and body.get("logprobs"):
            digest = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8
            keys = list(self.option_tokens) or ["A", "B"]
            weights = [digest] + [(1 - digest) / max(len(keys) - 1, 1)] * (len(keys) - 1)
            top = [{"token": k, "logprob": math.log(max(w, 1e-9)), "bytes": None} for k, w in zip(keys, weights)]
            content = [{**top[0], "top_logprobs": top[: body.get("top_logprobs") or 0]}]
            choice = {"index": 0, "message": {"role": "assistant", "content": keys[0]},
                      "logprobs": {"content": content} if self.logprobs else None, "finish_reason": "length"}
        else:
            text = reply(key, seed, self.backticks)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "stop"}
            usage = {"prompt_tokens": 1, "completion_tokens": len(text.split()), "total_tokens": len(text.split()) + 1}
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": self.model,
                "choices": [choice], "usage": usage}

    def _label(self, body: dict) -> dict:
        """The next token's log-probabilities: a preference for the first candidate that depends on the
        prompt (a digest), over the ids asked for on vLLM (logprob_token_ids), over the option tokens elsewhere."""
        digest = int(hashlib.sha256(body["prompt"].encode()).hexdigest()[:8], 16) / 16**8
        if self.kind == "vllm":
            keys = [f"token_id:{i}" for i in body.get("logprob_token_ids") or [0, 1]]
        else:
            keys = list(self.option_tokens)
        weights = [digest] + [(1 - digest) / max(len(keys) - 1, 1)] * (len(keys) - 1)
        top = {k: math.log(max(w, 1e-9)) for k, w in zip(keys, weights)}
        logprobs = {"tokens": [keys[0]], "token_logprobs": [top[keys[0]]], "top_logprobs": [top],
                    "text_offset": [0]} if self.logprobs else None
        choice = {"index": 0, "text": "A", "logprobs": logprobs, "finish_reason": "length"}
        return {"id": "cmpl-2", "object": "text_completion", "created": 0, "model": self.model, "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

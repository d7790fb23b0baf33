"""A tiny Hugging Face Hub on 127.0.0.1 that answers the endpoints `rlcd-data push` uses.

It keeps each dataset repo's files in memory and logs every request, so tests
assert on what the real `huggingface_hub` client sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, token: str = "hf_test_token"):
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}  # "ns/name" (main) or "ns/name@branch" -> files
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, bytes]] = []  # (method, path, body)
        self.fail_next_commits = 0  # answer this many commits with HTTP 500
        self.commits = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def all_bytes_received(self) -> bytes:
        return b"".join(body for _, _, body in self.requests)


def _key(repo: str, revision: str) -> str:
    return repo if revision == "main" else f"{repo}@{revision}"


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _reply(self, status: int, body: object = b"", headers: dict | None = None):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if not isinstance(body, bytes) else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding") == "chunked":
                data = b""
                while (size := int(self.rfile.readline().strip(), 16)) > 0:
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._reply(401, {"error": "Invalid credentials"}, {"X-Error-Message": "Invalid credentials"})
                return False
            return True

        def _route(self):
            path = unquote(urlparse(self.path).path)
            body = self._body()
            hub.requests.append((self.command, self.path, body))
            # LFS uploads go to pre-signed URLs, which carry no token.
            if not path.startswith("/lfs-upload/") and not self._authorized():
                return
            m = self.command, path
            if m == ("POST", "/api/repos/create"):
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                hub.repos.setdefault(repo, {})
                return self._reply(200, {"url": f"{hub.endpoint}/datasets/{repo}", "name": repo})
            if (r := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/branch/([^/]+)", path)) and self.command == "POST":
                if _key(r.group(1), r.group(2)) in hub.repos:
                    return self._reply(409, {"error": "Reference already exists"})
                hub.repos[_key(r.group(1), r.group(2))] = dict(hub.repos.get(r.group(1), {}))
                return self._reply(200, {})
            if m == ("POST", "/api/validate-yaml"):
                return self._reply(200, {"warnings": [], "errors": []})
            if (r := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/preupload/([^/]+)", path)) and self.command == "POST":
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [
                    {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".parquet") else "regular",
                     "shouldIgnore": False} for f in files]})
            if (r := re.fullmatch(r"/datasets/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)) and self.command == "POST":
                objects = json.loads(body)["objects"]
                return self._reply(200, {"transfer": "basic", "objects": [
                    {"oid": o["oid"], "size": o["size"],
                     "actions": {"upload": {"href": f"{hub.endpoint}/lfs-upload/{o['oid']}"}}} for o in objects]})
            if (r := re.fullmatch(r"/lfs-upload/([0-9a-f]+)", path)) and self.command == "PUT":
                hub.lfs[r.group(1)] = body
                return self._reply(200, {})
            if (r := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/commit/([^/]+)", path)) and self.command == "POST":
                if hub.fail_next_commits:
                    hub.fail_next_commits -= 1
                    return self._reply(500, {"error": "Internal Error"})
                return self._commit(_key(r.group(1), r.group(2)), body)
            if (r := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)) and self.command == "GET":
                repo, prefix = _key(r.group(1), r.group(2)), (r.group(3) or "/")[1:]
                if repo not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                files = [p for p in hub.repos[repo] if not prefix or p == prefix or p.startswith(prefix + "/")]
                if prefix and not files:
                    return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                return self._reply(200, [
                    {"type": "file", "path": p, "size": len(hub.repos[repo][p]),
                     "oid": hashlib.sha1(hub.repos[repo][p]).hexdigest()} for p in sorted(files)])
            if (r := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(/revision/[^/]+)?", path)) and self.command == "GET":
                repo = r.group(1)
                if repo not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return self._reply(200, {"id": repo, "sha": "0" * 40, "private": False,
                                         "siblings": [{"rfilename": p} for p in sorted(hub.repos[repo])]})
            if (r := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)) and self.command in ("GET", "HEAD"):
                repo, file = _key(r.group(1), r.group(2)), r.group(3)
                data = hub.repos.get(repo, {}).get(file)
                if data is None:
                    return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                etag = hashlib.sha1(data).hexdigest()
                return self._reply(200, data, {"X-Repo-Commit": "0" * 40, "ETag": f'"{etag}"'})
            return self._reply(404, {"error": f"fake hub: no route for {self.command} {path}"})

        def _commit(self, repo: str, body: bytes):
            files = dict(hub.repos.get(repo, {}))
            for line in body.decode().splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    files[value["path"]] = hub.lfs[value["oid"]]
                elif key in ("deletedFile", "deletedFolder"):
                    files = {p: b for p, b in files.items() if p != value["path"] and not p.startswith(value["path"] + "/")}
            hub.repos[repo] = files
            hub.commits += 1
            oid = hashlib.sha1(str(hub.commits).encode()).hexdigest()
            return self._reply(200, {"success": True, "commitOid": oid,
                                     "commitUrl": f"{hub.endpoint}/datasets/{repo}/commit/{oid}"})

        do_GET = do_POST = do_PUT = do_HEAD = _route

    return Handler

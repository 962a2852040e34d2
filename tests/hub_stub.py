"""A loopback stand-in for the Hugging Face Hub: the endpoints huggingface_hub 2.4 calls to create a repository
and upload a folder (hf_api.create_repo, upload_folder, _commit_api._fetch_upload_modes, _send_commit).

Every file is answered as a "regular" upload (base64 inside the commit), so neither LFS nor Xet storage is
needed. What arrives is recorded: repositories created (with their visibility), committed files (path ->
bytes, per repository) and the Authorization headers seen. A request without a token is answered 401, as
the Hub answers anonymous writes. Point huggingface_hub at it with HF_ENDPOINT (read at import time).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_PREUPLOAD = re.compile(r"^/api/models/([^/]+/[^/]+)/preupload/([^/?]+)")
_COMMIT = re.compile(r"^/api/models/([^/]+/[^/]+)/commit/([^/?]+)")


class HubStub:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.created: list[dict] = []  # every create request that was accepted: {repo_id, private}
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool}
        self.files: dict[str, dict[str, bytes]] = {}  # repo_id -> path -> content
        self.commits: list[dict] = []  # {repo_id, revision, summary, paths}
        self.authorization: list[str | None] = []  # Authorization header of every request
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self, token: str | None, home: str) -> dict[str, str]:
        """Environment for a subprocess that talks to this stub (and to nothing else)."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": home,
            "HF_TOKEN_PATH": f"{home}/token",
            "HF_TOKEN": token or "",
            "HUGGING_FACE_HUB_TOKEN": "",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    # ------------------------------------------------------------------ HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        """The request handler class of this stub's server: _Handler bound to this stub."""
        return type("Handler", (_Handler,), {"stub": self})


class _Handler(BaseHTTPRequestHandler):
    """One request to a HubStub (`stub` is set on the subclass each stub makes)."""

    protocol_version = "HTTP/1.1"
    stub: HubStub

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._chunked_body()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _chunked_body(self) -> bytes:
        data = b""
        while True:
            size = int(self.rfile.readline().strip(), 16)
            if size == 0:
                self.rfile.readline()
                return data
            data += self.rfile.read(size)
            self.rfile.readline()

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _record(self, method: str) -> bool:
        """Record the request; False (and a 401 sent) when it carries no token."""
        auth = self.headers.get("Authorization")
        with self.stub.lock:
            self.stub.requests.append((method, self.path))
            self.stub.authorization.append(auth)
        return auth is not None

    def do_GET(self) -> None:
        self._record("GET")
        # Repository info, refs, trees: nothing the push needs; 404 makes huggingface_hub go on.
        self._send(404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})

    def do_HEAD(self) -> None:
        self._record("HEAD")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        authorized = self._record("POST")
        body = self._body()
        path = self.path.split("?", 1)[0]
        if not authorized:
            self._send(401, {"error": "Invalid username or password."})
        elif path == "/api/repos/create":
            self._create(json.loads(body))
        elif path == "/api/validate-yaml":
            self._send(200, {"errors": [], "warnings": []})
        elif _PREUPLOAD.match(path):
            files = json.loads(body)["files"]
            self._send(
                200,
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        elif m := _COMMIT.match(path):
            self._commit(m.group(1), m.group(2), body)
        else:
            self._send(404, {"error": f"no such endpoint {path}"})

    def _create(self, payload: dict) -> None:
        stub = self.stub
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        body = {"url": f"{stub.url}/{repo_id}", "name": repo_id}
        with stub.lock:
            if repo_id in stub.repos:
                self._send(409, {**body, "error": "You already created this model repo"})
                return
            private = payload.get("visibility") == "private"
            stub.repos[repo_id] = {"private": private}
            stub.created.append({"repo_id": repo_id, "private": private, "type": payload.get("type")})
        self._send(200, body)

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        stub = self.stub
        header, paths = {}, []
        with stub.lock:
            if repo_id not in stub.repos:
                self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return
            store = stub.files.setdefault(repo_id, {})
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                elif not _apply_change(store, item, paths):
                    self._send(400, {"error": f"the stub takes regular files only, got {item['key']}"})
                    return
            oid = f"{len(stub.commits) + 1:040x}"
            stub.commits.append({"repo_id": repo_id, "revision": revision, "summary": header.get("summary"), "paths": paths})
        self._send(200, {"commitUrl": f"{stub.url}/{repo_id}/commit/{oid}", "commitOid": oid})


def _apply_change(store: dict[str, bytes], item: dict, paths: list[str]) -> bool:
    """One file or deletion line of a commit applied to a repository's files; False for any other kind of line."""
    value = item["value"]
    if item["key"] == "file":
        assert value.get("encoding", "base64") == "base64", value
        store[value["path"]] = base64.b64decode(value["content"])
        paths.append(value["path"])
        return True
    if item["key"] in ("deletedFile", "deletedFolder"):
        prefix = value["path"].rstrip("/")
        for p in [p for p in store if p == prefix or p.startswith(prefix + "/")]:
            del store[p]
        return True
    return False

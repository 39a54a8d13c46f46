"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1: one gated repository, served from
a local directory, to a client that sends the right token (huggingface_hub honours HF_ENDPOINT).

Just the endpoints huggingface_hub 2.4's snapshot_download and hf_hub_download call: repo info
(``/api/models/{repo}/revision/{rev}``), the recursive tree listing
(``/api/models/{repo}/tree/{sha}``) and file resolution (``HEAD``/``GET
/{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit`` and ``ETag``). Without the token every call
answers 401 with the Hub's gated-repo error code, as the real Hub does for meta-llama/*. Plain
HTTP downloads only: no Xet, no LFS pointers. Requests are counted per path for the tests.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class HubStandIn:
    def __init__(self, repo: str, model_dir: Path, token: str, host: str = "127.0.0.1") -> None:
        self.repo = repo
        self.token = token
        self.files = {str(p.relative_to(model_dir)): p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()}
        self.sha = hashlib.sha1(b"".join(self.files.values())).hexdigest()
        self.requests: Counter[str] = Counter()
        self.unauthorized_paths: Counter[str] = Counter()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _json(self, value: object, body: bool) -> None:
                self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, body)

            def _serve(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests[path] += 1
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    hub.unauthorized_paths[path] += 1
                    message = json.dumps({"error": f"Access to model {hub.repo} is restricted. You must have access to it and be authenticated to access it. Please log in."}).encode()
                    self._send(401, message, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted",
                                              "Content-Type": "application/json"}, body)  # fmt: skip
                    return
                info_prefix = f"/api/models/{hub.repo}/revision/"
                tree_prefix = f"/api/models/{hub.repo}/tree/"
                resolve_prefix = f"/{hub.repo}/resolve/"
                if path.startswith(info_prefix):
                    self._json({"id": hub.repo, "modelId": hub.repo, "sha": hub.sha, "private": False, "gated": "manual",
                                "siblings": [{"rfilename": name} for name in hub.files]}, body)  # fmt: skip
                elif path.startswith(tree_prefix):
                    folder = path[len(tree_prefix):].partition("/")[2]  # after the revision
                    entries = [{"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
                               for name, data in hub.files.items() if not folder or name.startswith(folder + "/")]  # fmt: skip
                    if folder and not entries:
                        self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, body)
                        return
                    self._json(entries, body)
                elif path.startswith(resolve_prefix):
                    name = path[len(resolve_prefix):].split("/", 1)[1]
                    if name not in hub.files:
                        self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": hub.sha}, body)
                        return
                    data = hub.files[name]
                    self._send(200, data, {"X-Repo-Commit": hub.sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                           "Content-Type": "application/octet-stream"}, body)  # fmt: skip
                else:
                    self._send(404, b"not found", {"X-Error-Code": "RepoNotFound"}, body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

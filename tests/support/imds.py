"""A stand-in for the EC2 instance metadata service (IMDSv2) on 127.0.0.1, for the node's
scripts: a session token, the instance id, and instance tags (launch templates enable metadata
tags, infra/components/fleet.py). Scripts reach it through their VLLM_FLEET_IMDS test switch."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ASG_TAG = "aws:autoscaling:groupName"


class FakeImds:
    """IMDSv2 on 127.0.0.1: PUT a token, then GET instance-id and tags/instance/<key> with it."""

    def __init__(self, instance_id: str, group: str, tags: Mapping[str, str] | None = None) -> None:
        token = "t0ken"
        paths = {"/latest/meta-data/instance-id": instance_id}
        for key, value in {ASG_TAG: group, **(tags or {})}.items():
            paths[f"/latest/meta-data/tags/instance/{key}"] = value
        self.paths = paths

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                self._reply(token if self.path == "/latest/api/token" else None)

            def do_GET(self) -> None:
                ok = self.headers.get("X-aws-ec2-metadata-token") == token
                self._reply(paths.get(self.path) if ok else None)

            def _reply(self, body: str | None) -> None:
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

"""A stand-in for the Hub's HTTP API on 127.0.0.1 that records upload requests (for offline tests)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandInHub:
    def __init__(self):
        self.requests: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append({"method": "GET", "path": self.path, "auth": self.headers.get("authorization")})
                self._reply(404, {"error": "not found"})

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                hub.requests.append({"method": "POST", "path": self.path, "body": raw,
                                     "auth": self.headers.get("authorization")})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    name = json.loads(raw)
                    repo = f"{name.get('organization') or 'user'}/{name['name']}"
                    return self._reply(200, {"url": f"{hub.url}/{repo}"})
                if "/preupload/" in path:
                    files = json.loads(raw)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if "/commit/" in path:  # /api/{type}s/{owner}/{name}/commit/{revision}
                    kind, owner, name = path.split("/")[2:5]
                    prefix = "" if kind == "models" else f"/{kind}"
                    return self._reply(200, {"commitUrl": f"{hub.url}{prefix}/{owner}/{name}/commit/{'0' * 40}",
                                             "commitOid": "0" * 40})
                if path == "/api/validate-yaml":  # the Hub checks the model card's metadata
                    return self._reply(200, {"warnings": [], "errors": []})
                if "/branch/" in path:
                    return self._reply(200, {})
                return self._reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def committed_files(self) -> dict[str, bytes]:
        """path → content of every file sent inline in commit requests."""
        import base64

        files = {}
        for r in self.requests:
            if r["method"] == "POST" and "/commit/" in r["path"]:
                for line in r["body"].splitlines():
                    item = json.loads(line)
                    if item.get("key") == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return files

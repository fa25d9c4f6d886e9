"""A loopback server of weight files for the download tests, run as `python tests/weights_server.py
ROOT PORT`: plain HTTP (`/<file>`, as a publisher's file server) and the Hugging Face hub's file
protocol (`/<org>/<repo>/resolve/<revision>/<file>` with its `X-Repo-Commit` and `ETag` headers, what
`HF_ENDPOINT` points `huggingface_hub` at). ROOT/faults.json (read on every request) injects
faults per file: `corrupt_once` (other bytes of the same length, the first time), `drop_once` /
`drop_always` (the connection closed halfway through the body), `missing` (404). Every request is
appended to ROOT/requests.log."""
from __future__ import annotations

import hashlib
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(sys.argv[1])
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def served(path: str) -> Path | None:
    """The file a request path names (the hub's resolve URLs map to ROOT/<org>/<repo>/<file>)."""
    parts = path.lstrip("/").split("?")[0].split("/")
    if len(parts) >= 5 and parts[2] == "resolve":
        parts = parts[:2] + parts[4:]
    file = ROOT.joinpath(*parts)
    return file if file.is_file() else None


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _fault(self, file: Path) -> str | None:
        faults = json.loads((ROOT / "faults.json").read_text()) if (ROOT / "faults.json").is_file() else {}
        key = str(file.relative_to(ROOT))
        fault = faults.get(key)
        seen = [line for line in (ROOT / "requests.log").read_text().splitlines()
                if line == f"GET {key}"] if (ROOT / "requests.log").is_file() else []
        if fault in ("corrupt_once", "drop_once") and len(seen) > 1:
            return None
        return fault

    def _answer(self, body: bool) -> None:
        file = served(self.path)
        with open(ROOT / "requests.log", "a") as log:
            log.write(f"{self.command} {file.relative_to(ROOT) if file else self.path}\n")
        fault = self._fault(file) if file else None
        if file is None or fault == "missing":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if not body:
            return
        if fault == "corrupt_once":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        if fault in ("drop_once", "drop_always"):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(data)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's names
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()

"""A server process on a free port of the loopback interface, returned once it accepts connections:
the loader benchmark's and the streaming tests' HTTP and S3 servers."""
from __future__ import annotations

import socket
import subprocess
import sys
import time


def start_loopback_server(argv: list[str], cwd: str | None = None, wait_s: float = 30.0) -> tuple[subprocess.Popen, int]:
    """`python ARGV` (`{port}` in argv: the chosen port) -> (the process, the port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, *[a.format(port=port) for a in argv]], cwd=cwd, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + wait_s
    while time.time() < deadline and server.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server, port
        time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"{' '.join(argv[:2])} did not start on the loopback interface")

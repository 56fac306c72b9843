"""A web server of the command line in a child process, for tests that need a real server: one
that can be killed with SIGKILL and started again, and that a browser can reach."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

_URL = re.compile(r"serving .* at (http://\S+/)")


class ServerProcess:
    """`imagetransformer ARGS --port PORT` in a child process (0: a free port); `url` once it
    listens."""

    def __init__(self, *args: str, port: int = 0, timeout: float = 60.0) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imagetransformer", *args, "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.output: list[str] = []
        found = threading.Event()
        self.url = ""

        def read() -> None:
            for line in self.process.stdout:
                self.output.append(line)
                match = _URL.search(line)
                if match and not found.is_set():
                    self.url = match.group(1)
                    found.set()
            found.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not found.wait(timeout) or not self.url:
            self.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.output))
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.url} did not answer:\n" + "".join(self.output))

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.url.split("//")[1].rstrip("/").rsplit(":", 1)
        return host, int(port)

    def kill(self) -> None:
        """SIGKILL: no clean-up, as a crash or an OOM kill would leave it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Stop it with `sig` (Ctrl-C's by default); its exit code (SIGKILL after 15 s)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def lines(self) -> list[str]:
        """What it has printed (stdout and stderr): all of it once it has ended."""
        if self.process.poll() is not None:
            self._reader.join(10)
        return "".join(self.output).splitlines()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""A `vllm serve` subprocess for tests: bound to 127.0.0.1, logged to a file, always killed as a group.

Every wait here is bounded; every failure message carries the tail of the server log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VLLM_CLI = str(Path(sys.executable).with_name("vllm"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """``vllm serve <model> <args>`` on 127.0.0.1:<free port>, in its own process group."""

    def __init__(self, model: str | os.PathLike, args: list[str], log_path: Path,
                 env: dict[str, str | None] | None = None):
        """``env`` is laid over os.environ; a value of None removes that variable."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.cmd = [VLLM_CLI, "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=full_env, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def wait_healthy(self, timeout: float) -> float:
        """Poll /health until it answers 200; returns the seconds waited. Fails if the server exits."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before /health "
                                   f"answered:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve did not become healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def get(self, path: str, timeout: float = 30) -> str:
        with urllib.request.urlopen(f"{self.base_url}{path}", timeout=timeout) as r:
            return r.read().decode()

    def post(self, path: str, payload: dict, timeout: float = 60) -> dict:
        req = urllib.request.Request(f"{self.base_url}{path}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample on /metrics as (name, labels, value)."""
        from prometheus_client.parser import text_string_to_metric_families

        return [(s.name, dict(s.labels), s.value)
                for family in text_string_to_metric_families(self.get("/metrics"))
                for s in family.samples]


    def stop(self, grace: float = 20) -> None:
        """SIGTERM the whole process group (API server, engine core, workers), SIGKILL after ``grace``."""
        try:
            if self.proc.poll() is None:
                _signal_group(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            # Children (engine core, workers) may outlive the API server: kill whatever is left.
            _signal_group(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._log.close()


def metric(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``; fails if there are none."""
    matches = [v for n, l, v in samples if n == name and all(l.get(k) == x for k, x in labels.items())]
    if not matches:
        names = sorted({n for n, _, _ in samples if n.startswith("vllm:")})
        raise KeyError(f"no metric {name} {labels or ''} on /metrics; vllm metrics are: {names}")
    return sum(matches)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

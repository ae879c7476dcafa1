"""A real mosquitto broker for tests, started on a free loopback port.

``Broker.start(workdir, config_lines=...)`` writes a config (listener on 127.0.0.1 at a free
port, plus any extra lines, e.g. password_file/acl_file/TLS) and waits until the port
accepts connections. ``stop()``/``kill()`` and ``restart()`` (same port) let tests cut the
broker mid-stream.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tensorslm.cli.embedded_broker import free_port  # noqa: F401  (tests import it from here)

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


@dataclass
class Broker:
    workdir: Path
    port: int
    config_lines: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, workdir: Path, config_lines: list[str] | None = None,
              port: int | None = None) -> "Broker":
        broker = cls(Path(workdir), port or free_port(), list(config_lines or []))
        broker._launch()
        return broker

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def _launch(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = self.config_lines
        has_listener = any(line.startswith("listener") for line in lines)
        head = [] if has_listener else [f"listener {self.port} {self.host}",
                                        "allow_anonymous true"]
        self.config_path.write_text("\n".join(head + ["persistence false"] + lines) + "\n")
        self.log_path = self.workdir / "mosquitto.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"mosquitto did not start; log:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.stop()

    def restart(self) -> None:
        self.stop()
        self._launch()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

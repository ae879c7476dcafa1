"""systemd notify messages on a fake NOTIFY_SOCKET (a unix datagram socket we bind)."""
from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from tensorslm.agent.systemd_notify import Notifier


@pytest.fixture
def notify_socket():
    path = Path(f"/tmp/tslm-n-{uuid.uuid4().hex[:12]}")   # short: unix paths are <= 107 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield path, sock
    sock.close()
    path.unlink(missing_ok=True)


def drain(sock: socket.socket, timeout: float = 0.1) -> list[str]:
    sock.settimeout(timeout)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except socket.timeout:
        return out


def test_ready_status_stopping_arrive_as_datagrams(notify_socket):
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    assert notifier.ready("serving pi-01")
    assert notifier.status("reconnecting")
    assert notifier.stopping()
    assert drain(sock) == ["READY=1\nSTATUS=serving pi-01", "STATUS=reconnecting", "STOPPING=1"]


def test_watchdog_pings_at_half_of_watchdog_usec(notify_socket):
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000",
                         "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval == pytest.approx(0.1)
    pings = 0
    end = time.monotonic() + 0.45
    while time.monotonic() < end:
        pings += notifier.watchdog_due()
        time.sleep(0.01)
    assert 4 <= pings <= 6   # at 0, 0.1, 0.2, 0.3, 0.4 s
    assert drain(sock) == ["WATCHDOG=1"] * pings


@pytest.mark.parametrize("env, interval", [
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),   # meant for another process
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
])
def test_watchdog_interval_from_environment(env, interval):
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent", **env}).watchdog_interval == interval


def test_outside_systemd_nothing_is_sent():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.watchdog_due() is False


def test_abstract_socket_name(notify_socket):
    name = f"tslm-{uuid.uuid4().hex[:12]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        sock.settimeout(2)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_unreachable_socket_is_logged_not_raised(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level("WARNING"):
        assert notifier.ready() is False
    assert "cannot notify systemd" in caplog.text


def test_agent_sends_ready_watchdog_and_stopping(notify_socket, mosquitto, tmp_path):
    from tests.agents import running_agent

    path, sock = notify_socket

    class NoModel:   # never called: this test sends no prompt
        model_ref, embedding, max_prompt_tokens, rung = "none", None, 1024, None
        precision, precisions = "fp32", ["fp32"]

        def set_precision(self, precision):
            raise AssertionError("not expected to switch")

        def generate(self, request, *, max_new_tokens, on_token=None, stop=None):
            raise AssertionError("not expected to generate")

    with running_agent(mosquitto.url, "pi-n", NoModel(), tmp_path / "q.db", tick_s=0.01,
                       notifier=Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})):
        time.sleep(0.3)
    messages = drain(sock)
    assert any(m.startswith("READY=1\nSTATUS=serving pi-n") for m in messages)
    assert messages.count("WATCHDOG=1") >= 4
    assert messages[-1].startswith("STOPPING=1")

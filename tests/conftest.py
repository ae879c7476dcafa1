"""Shared fixtures. Each swaps a global default or starts a real server, and cleans up."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.brokers import MOSQUITTO, Broker

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

# The hub is never reachable here; make transformers fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def mosquitto(tmp_path):
    """A real mosquitto broker on a free loopback port (anonymous, plain MQTT)."""
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed; `make test` installs the Debian package")
    broker = Broker.start(tmp_path / "broker")
    yield broker
    broker.stop()


@pytest.fixture
def mock_factory():
    """gpiozero's global pin factory swapped for its MockFactory, and restored afterwards; the
    test is skipped where gpiozero is not installed."""
    gpiozero = pytest.importorskip("gpiozero")
    from gpiozero.pins.mock import MockFactory

    saved = gpiozero.Device.pin_factory
    gpiozero.Device.pin_factory = MockFactory()
    yield gpiozero.Device.pin_factory
    gpiozero.Device.pin_factory.reset()
    gpiozero.Device.pin_factory = saved


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.exists():
        pytest.fail(f"WikiText-2 test text not found at {WIKITEXT} (../shared beside the repo)")
    return WIKITEXT

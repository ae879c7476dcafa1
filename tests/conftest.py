"""Shared fixtures: the tiny model, built once per test module; the others swap a global
default or start a real server, and clean up."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.brokers import MOSQUITTO, Broker
from tests.tiny_model import tiny_model

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

# The hub is never reachable here; make transformers fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    """``(model, tokenizer)`` from tests/tiny_model.py, shared by the tests of one module; a
    test that changes the model builds its own."""
    return tiny_model()


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

"""AgentActuator: a point's knobs reach the generator between queries; a point that names no
body precision runs the agent's own, whatever point came before it."""
from __future__ import annotations

import pytest

from tensorslm.agent.actuator import AgentActuator
from tensorslm.agent.generation import GenerationError
from tensorslm.controller.decision.operating_point import OperatingPoint


class FakeGenerator:
    """The parts of the Generator protocol the actuator uses, with int8 and int4 resident."""

    model_ref = "fake"
    embedding = None

    def __init__(self) -> None:
        self.max_prompt_tokens = 1024
        self._precision = "int8"

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def precisions(self) -> list[str]:
        return ["int8", "int4"]

    def set_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise GenerationError(f"body precision {precision!r} is not resident")
        self._precision = precision


def switch(actuator: AgentActuator, point: OperatingPoint) -> str:
    actuator.apply(point)
    actuator.take()
    return actuator.generator.precision


def test_a_point_without_a_precision_returns_to_the_agents_own():
    actuator = AgentActuator(FakeGenerator())
    full = OperatingPoint("full", threads=1, max_new_tokens=256)
    eco = OperatingPoint("eco", threads=1, max_new_tokens=32, max_prompt_tokens=256, precision="int4")
    assert [switch(actuator, p) for p in (full, eco, full, eco)] == ["int8", "int4", "int8", "int4"]
    assert actuator.generator.max_prompt_tokens == 256 and actuator.cap(None, 100) == 32


def test_a_precision_that_is_not_resident_fails_the_switch():
    actuator = AgentActuator(FakeGenerator())
    with pytest.raises(GenerationError, match="'bf16' is not resident"):
        switch(actuator, OperatingPoint("x", threads=1, max_new_tokens=8, precision="bf16"))

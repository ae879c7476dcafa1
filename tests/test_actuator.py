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


def _omp_worker_cpu_s() -> float:
    """CPU seconds of this process's threads that Python did not start (OpenMP's workers)."""
    import os
    import threading
    import time

    python = {t.native_id for t in threading.enumerate()}
    total = 0.0
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid not in python:
            try:   # a thread's CPU clock: clockid MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)
                total += time.clock_gettime(((~tid) << 3) | 6)
            except OSError:   # the thread ended meanwhile
                pass
    return total


def test_a_points_thread_count_reaches_the_engines_decode_step(mosquitto, tmp_path):
    """The controller applies a point from its own thread; the agent switches torch's thread
    count in the thread that serves, so the engine's TorchScript decode step runs on the
    point's threads: OpenMP workers work during the decode steps of a 2-thread point and not
    at all at 1 thread. (OpenMP's thread count belongs to each calling thread: set from the
    controller's thread it would not reach the step.)"""
    import threading
    import time

    from tensorslm.agent.broker_config import BrokerConfig
    from tensorslm.agent.client import AskClient
    from tensorslm.agent.config import ServingConfig
    from tensorslm.agent.wiring import make_generator

    from .agents import running_agent
    from .tiny_model import tiny_loaded_model

    generator = make_generator(tiny_loaded_model(hidden=256), None, precision="int8")
    engine = generator.engine
    assert engine.scripted, "the tiny model's int8 body must decode through the scripted step"
    worker_cpu: list[float] = []   # OpenMP workers' CPU seconds over one query's decode steps
    step = engine.step

    def measured_step(token: int, position: int):
        before = _omp_worker_cpu_s()
        logits = step(token, position)
        worker_cpu[-1] += _omp_worker_cpu_s() - before
        return logits

    engine.step = measured_step
    actuator = AgentActuator(generator)
    with (running_agent(mosquitto.url, "pi-t", generator, tmp_path / "t.db", actuator=actuator,
                        serving=ServingConfig(max_new_tokens=24)),
          AskClient(BrokerConfig.from_url(mosquitto.url)) as client):
        for threads in (2, 1, 2):
            # as the controller does: from a thread of its own, between queries
            controller = threading.Thread(target=actuator.apply, args=(
                OperatingPoint(f"t{threads}", threads=threads, max_new_tokens=24),))
            controller.start()
            controller.join()
            time.sleep(0.2)   # OpenMP's default wait: workers spin a moment after a region
            worker_cpu.append(0.0)
            reply = client.ask("the small model runs on a raspberry pi", device="pi-t",
                               timeout=30)
            assert reply.body["output_tokens"] > 1, reply.body
    two, one, two_again = worker_cpu
    assert two > 0 and two_again > 0, worker_cpu
    assert one == 0.0, worker_cpu


@pytest.mark.parametrize("owner_threads, expected", [(None, 1), ("2", 2)])
def test_before_any_point_queries_run_on_the_default_threads(monkeypatch, owner_threads,
                                                             expected):
    """An agent without a policy serves on DEFAULT_THREADS (1), in the thread that serves;
    an owner's OMP_NUM_THREADS is left as torch read it."""
    import threading

    import torch

    from tensorslm.agent.actuator import DEFAULT_THREADS

    if owner_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", owner_threads)
    actuator = AgentActuator(FakeGenerator())
    original = torch.get_num_threads()
    torch.set_num_threads(2)   # torch's start-up default on a 2-core board
    seen = []

    def serve():
        assert actuator.take() is None
        seen.append(torch.get_num_threads())

    try:
        server = threading.Thread(target=serve)
        server.start()
        server.join()
    finally:
        torch.set_num_threads(original)
    assert DEFAULT_THREADS == 1 and seen == [expected]

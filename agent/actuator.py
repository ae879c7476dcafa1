"""The agent's side of :class:`tensorslm.controller.decision.operating_point.Actuator`.

``apply(point)`` only records the point (the controller may call it from any thread, at any
time); the daemon calls :meth:`AgentActuator.take` between queries, which switches the
embedding rung (``TTEmbedding.set_rung``), the torch thread count, the prompt-token cap of
the generator, the body precision (among those resident) and the generation cap.
So a switch never lands in the middle of a query. Until a point is applied (an agent without
a policy) queries run on :data:`DEFAULT_THREADS`, unless the owner set ``OMP_NUM_THREADS``.
The thread count is set in the serving thread: torch's OpenMP thread count belongs to each
calling thread.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

from tensorslm.controller.decision.operating_point import OperatingPoint

from .generation import Generator

log = logging.getLogger(__name__)

#: torch threads before any point is applied: a second thread costs 1.16-1.53x the CPU per token
#: (energy) for 1.29-1.70x in wall time (docs/engine.md, Threads); a policy's point may ask for it
DEFAULT_THREADS = 1


class AgentActuator:
    """Applies operating points to ``generator``: its embedding's rung, its prompt cap (never
    above the cap it was built with), its body precision (a point that names none runs the
    precision the generator was built with), the torch thread count and the generation cap."""

    def __init__(self, generator: Generator, initial: OperatingPoint | None = None) -> None:
        self.generator = generator
        self._prompt_cap = generator.max_prompt_tokens
        self._precision = generator.precision   # the agent's own, for points that name none
        self._lock = threading.Lock()
        self._pending: OperatingPoint | None = initial
        self._active: OperatingPoint | None = None
        # threads before any point: the owner's OMP_NUM_THREADS (torch's own start-up), else ours
        self._default_threads = None if os.environ.get("OMP_NUM_THREADS") else DEFAULT_THREADS

    def apply(self, point: OperatingPoint) -> None:
        """Record ``point``; it takes effect at the start of the next query."""
        if not isinstance(point, OperatingPoint):
            raise TypeError(f"expected an OperatingPoint, got {type(point).__name__}")
        with self._lock:
            self._pending = point

    @property
    def active(self) -> OperatingPoint | None:
        return self._active

    @property
    def pending(self) -> OperatingPoint | None:
        return self._pending

    def take(self) -> OperatingPoint | None:
        """Apply the pending point, if any; return the point the next query runs at."""
        with self._lock:
            point, self._pending = self._pending, None
        if point is None or point == self._active:
            # a generator that runs torch has imported it; one that does not (a stub) is not
            # kept waiting for torch's import before its first query
            torch = sys.modules.get("torch")
            threads = self._default_threads
            if (torch is not None and self._active is None and threads
                    and torch.get_num_threads() != threads):
                torch.set_num_threads(threads)
            return self._active
        import torch

        embedding = self.generator.embedding
        if embedding is not None and embedding.active_rung != point.rung:
            embedding.set_rung(point.rung)
        precision = point.precision or self._precision
        if precision != self.generator.precision:
            self.generator.set_precision(precision)
        if point.threads != torch.get_num_threads():
            torch.set_num_threads(point.threads)
        self.generator.max_prompt_tokens = min(self._prompt_cap, point.max_prompt_tokens
                                               or self._prompt_cap)
        log.info("operating point %s applied (rung %s, %s body, %d threads, cap %d tokens)",
                 point.name, point.rung, self.generator.precision, point.threads,
                 point.max_new_tokens)
        self._active = point
        return point

    def cap(self, requested: int | None, default: int) -> int:
        """Tokens to generate: the request's number (or ``default``) within the point's cap."""
        wanted = default if requested is None else requested
        return min(wanted, self._active.max_new_tokens) if self._active else wanted

"""An operating point: a named combination of knobs, and the interface that applies one.

The controller chooses a point; the agent implements :class:`Actuator` (switching the
embedding rung through ``rank_store``'s ``TTEmbedding.set_rung``, the torch thread count,
the generation cap, ...). The controller never imports the agent or MQTT.

Knobs, and why each is here (their measured cost per query and per token, with the command
that measures it: bench/results/operating_points.md):

- ``threads``: at batch size 1 a second thread makes decode 1.29-1.70x faster in wall time for
  1.16-1.53x the CPU time (docs/engine.md, Threads), so one thread costs less energy per token
  and a second one suits a point where latency matters more than energy (external power).
- ``max_new_tokens``: decoding cost is linear in generated tokens; the cap bounds a query.
- ``max_prompt_tokens``: prefill cost grows with the prompt (and attention with the context).
- ``rung``: the compressed embedding; with the head computed from the rung (head ``tied``,
  docs/head.md) the LM head matmul, which reads the whole table at every token, is where the
  rung's size shows at decode time.
- ``precision``: the body's weight precision (``fp32``, ``bf16``, ``int8``, ``w8a8``,
  ``int4``; None: the agent's default). Decoding is bound by the bytes of weights read per
  token, so a narrower body costs less CPU per token at some perplexity (docs/engine.md has
  both, measured).
  A point may name a precision only where the agent keeps that body resident.

These five are every knob the agent applies; the policy parser refuses any other.

A point may carry figures: ``watts`` (mean power while serving at this point) and
``joules_per_query``, each with ``figures_method`` saying how they were obtained
(``ina219``, ``estimated``, ...). The power-budget rule uses ``watts``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tensorslm.constants import FULL_RUNG

from tensorslm.controller.power.readings import Method


@dataclass(frozen=True)
class OperatingPoint:
    name: str
    rung: str = FULL_RUNG              # a rung name of the rank store ladder
    max_new_tokens: int = 128          # cap on generated tokens per query
    threads: int = 1                   # torch intra-op threads
    max_prompt_tokens: int | None = None   # cap on prompt/context tokens (None: the model's)
    precision: str | None = None           # body precision, one of BODY_PRECISIONS (None: the agent's)
    watts: float | None = None             # mean power at this point, when known
    joules_per_query: float | None = None  # mean energy of one query at this point, when known
    figures_method: Method | None = None   # how watts/joules_per_query were obtained

    def describe(self) -> str:
        """One line for logs and tables: ``eco (rung r16, 1 thread, 48 new tokens)``."""
        parts = [f"rung {self.rung}", f"{self.threads} thread{'s' if self.threads != 1 else ''}",
                 f"{self.max_new_tokens} new tokens"]
        if self.max_prompt_tokens is not None:
            parts.append(f"{self.max_prompt_tokens} prompt tokens")
        if self.precision is not None:
            parts.append(f"{self.precision} body")
        if self.watts is not None:
            parts.append(f"{self.watts:g} W {self.figures_method or ''}".rstrip())
        return f"{self.name} ({', '.join(parts)})"


class Actuator(Protocol):
    """Applies an operating point.

    Contract: ``apply`` must not interrupt a query in progress. The new point takes effect
    for the next query (the rung may switch at the next forward pass, which is safe because a
    rung changes only the embedding lookup). ``apply`` should return quickly (store the point
    and let the serving thread pick it up); it may raise, in which case the controller logs
    the error, keeps the previous point as current and tries again at the next tick.
    """

    def apply(self, point: OperatingPoint) -> None: ...

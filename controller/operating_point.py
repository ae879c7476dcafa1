"""An operating point: a named combination of knobs, and the interface that applies one.

The controller chooses a point; the agent implements :class:`Actuator` (switching the
embedding rung through ``rank_store``'s ``TTEmbedding.set_rung``, the torch thread count,
the generation cap, ...). The controller never imports the agent or MQTT.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class OperatingPoint:
    name: str
    rung: str = "full"                 # a rung name of the rank store ladder
    max_new_tokens: int = 128          # cap on generated tokens per query
    threads: int = 1                   # torch intra-op threads
    extra: dict = field(default_factory=dict, hash=False, compare=False)  # further knobs


class Actuator(Protocol):
    """Applies an operating point. Must not interrupt a query in progress: the new point
    takes effect for the next query (or the next forward, for the rung)."""

    def apply(self, point: OperatingPoint) -> None: ...

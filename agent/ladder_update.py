"""Replacing the ladder of a running agent: verify everything first, swap between queries.

``{"command": "load_ladder", "path": DIR}`` on the device's command topic (operator only, by
the broker ACL) starts :func:`prepare_ladder` off the serving thread: the new store is opened
(format version, source model and every file's sha256 checked), every rung the energy policy
names must be in it, and all its rungs are loaded. Only then does the daemon swap it in, at
the next moment no query is running (``TTEmbedding.adopt``). A store that fails any check is
refused with a logged reason and reported in telemetry; the old ladder keeps serving.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from .errors import AgentError

if TYPE_CHECKING:
    from tensorslm.rank_store.embedding import TTEmbedding

log = logging.getLogger(__name__)


class LadderRejected(AgentError, ValueError):
    """A new ladder cannot replace the one being served."""


@dataclass(frozen=True)
class LadderEvent:
    """The last ladder change asked of this agent, as telemetry reports it."""

    path: str
    status: str            # "verifying" | "pending" | "active" | "refused"
    message: str = ""

    def to_dict(self) -> dict:
        return {"path": self.path, "status": self.status, "message": self.message}


def prepare_ladder(path: str | Path, embedding: "TTEmbedding | None",
                   needed_rungs: Iterable[str] = ()) -> "TTEmbedding":
    """A fully loaded, verified ``TTEmbedding`` of the store at ``path``, ready to adopt.

    Raises :class:`LadderRejected` or a ``RankStoreError`` naming the file and the problem.
    """
    from tensorslm.rank_store.embedding import TTEmbedding
    from tensorslm.rank_store.store import RankStore

    if embedding is None:
        raise LadderRejected("this agent serves the dense embedding and has no ladder to replace; "
                             "set model.store in agent.yaml to serve a ladder")
    current = embedding.store
    store = RankStore.open(path, expect_source=current.source if current is not None else None)
    needed = set(needed_rungs) | {embedding.active_rung}
    missing = sorted(needed - set(store.rung_names))
    if missing:
        raise LadderRejected(f"{path}: the ladder lacks rungs {', '.join(missing)} that the energy "
                             f"policy or the current point uses; it has {', '.join(store.rung_names)}")
    return TTEmbedding.from_store(store)   # every rung loaded, each file's hash checked again

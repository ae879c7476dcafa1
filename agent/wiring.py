"""From a config to a serving agent, written once: model -> store -> TTEmbedding -> install ->
generator -> actuator -> meter -> Controller -> Agent.

``tensorslm serve`` calls :func:`build_agent`; the demo and the benches call the steps they
share with it (:func:`load_serving`, :func:`control`) and give their own power source,
policy timing and serving settings. :func:`make_generator` is the one place that chooses the
engine that runs the model. Heavy imports (torch, transformers) happen inside the functions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from tensorslm.constants import DEFAULT_BODY_PRECISION

from .actuator import AgentActuator
from .config import AgentConfig
from .daemon import Agent
from .generation import Generator
from .query_log import QueryLog
from .systemd_notify import Notifier
from .topics import Topics

if TYPE_CHECKING:
    from tensorslm.config_file import Section
    from tensorslm.controller.decision.control_loop import Controller
    from tensorslm.controller.decision.policy import Policy
    from tensorslm.controller.power.energy_meter import EnergyMeter
    from tensorslm.controller.power.readings import PowerSource
    from tensorslm.rank_store.embedding import TTEmbedding
    from tensorslm.rank_store.models import LoadedModel
    from tensorslm.rank_store.store import RankStore

log = logging.getLogger(__name__)


@dataclass
class ServingModel:
    """A model ready to serve: the loaded model, its ladder (if any) installed, the generator
    and the actuator that switches it between operating points."""

    loaded: "LoadedModel"
    store: "RankStore | None"
    embedding: "TTEmbedding | None"
    generator: Generator
    actuator: AgentActuator

    @property
    def rungs(self) -> list[str] | None:
        """The ladder's rung names (what a policy may name: a rung not loaded yet is loaded,
        verified, at its first switch), None without a store."""
        return list(self.store.rung_names) if self.store is not None else None


def make_generator(loaded: "LoadedModel", embedding: "TTEmbedding | None", *,
                   max_prompt_tokens: int = 1024, model_ref: str | None = None,
                   precision: str = DEFAULT_BODY_PRECISION, precisions: Iterable[str] = (),
                   store: "RankStore | None" = None, release_model_body: bool = False
                   ) -> Generator:
    """The engine that runs ``loaded`` (with ``embedding`` installed, if any): the packed-body
    engine (:class:`~tensorslm.agent.generation.EngineGenerator`) serving ``precision`` first,
    with every body in ``precisions`` resident too. Each body comes from ``store`` where it
    holds it (verified by hash), else it is quantized from the model now. With
    ``release_model_body`` the model's own body weights are dropped afterwards (the agent:
    only the embedding, the head and the norms of the loaded model stay in use; the model's
    Hugging Face forward no longer runs)."""
    from tensorslm.rank_store.body import (BodyFormatError, body_for, family_of, load_body,
                                           release_linears, stored_body)

    from .generation import EngineGenerator, HFGenerator

    try:
        family_of(loaded.model)
    except BodyFormatError as exc:   # a family the engine does not run: the HF forward, fp32
        if precision != "fp32" or any(p != "fp32" for p in precisions):
            log.warning("%s; serving the fp32 body through the Hugging Face forward instead "
                        "of %s", exc, ", ".join(dict.fromkeys([precision, *precisions])))
        return HFGenerator(loaded.model, loaded.tokenizer, embedding,
                           max_prompt_tokens=max_prompt_tokens, model_ref=model_ref or loaded.ref,
                           needs_bos=loaded.needs_bos)
    bodies = {}
    for name in dict.fromkeys([precision, *precisions]):
        source = stored_body(store, name)
        if source is not None:
            bodies[name] = load_body(store, loaded.model, name)
        else:
            log.info("body %s quantized at start-up (a store keeps it precomputed: "
                     "tensorslm compress --bodies %s)", name, name)
            bodies[name] = body_for(loaded.model, name, read=loaded.read_weight)
        if name == "w8a8" and source != "w8a8":
            log.info("body w8a8 without input scales (a calibrated one is closer to fp32: "
                     "docs/engine.md); tensorslm compress --bodies w8a8 stores a calibrated one")
    if release_model_body:
        release_linears(loaded.model)
    return EngineGenerator(loaded.model, loaded.tokenizer, embedding, bodies, precision,
                           max_prompt_tokens=max_prompt_tokens,
                           model_ref=model_ref or loaded.ref, needs_bos=loaded.needs_bos)


def load_serving(model: "str | LoadedModel", store: "str | Path | RankStore | None" = None,
                 head: str | None = None, *, max_prompt_tokens: int = 1024,
                 model_ref: str | None = None, precision: str = DEFAULT_BODY_PRECISION,
                 precisions: Iterable[str] = (), release_model_body: bool = False,
                 rescore: str | None = None, rungs: Iterable[str] | None = None,
                 top_k: int | None = None) -> ServingModel:
    """Load ``model`` (a reference, or an already loaded model), open ``store`` (a path or an
    open :class:`RankStore`; None serves the model's own embedding), install its ladder with
    ``head`` (None: the embedding's default; ``rescore``: the two-stage head's finer rung, see
    docs/head.md; ``top_k``: rescore the coarse top-k instead) and build the generator (body
    ``precision``, ``precisions`` resident too) and actuator. ``rungs``: the rungs to load now
    (default: every rung of the store; the first in the store's order is active); any other
    loads at its first switch. A ``w8a8`` agent's tied head runs its int8 rows with int8
    activations too (:class:`~tensorslm.rank_store.embedding.TiedTTHead`).

    ``release_model_body``: only the engine will run the model (``tensorslm serve``). A
    reference is then loaded as its shell (:mod:`tensorslm.rank_store.shell`: config, norms
    and rotary tables without importing transformers): the body's fp32 weights stay in the
    checkpoint (the engine's body comes from the store, or is quantized one linear at a time),
    and so does the input table when a ladder with the tied head replaces it; an already loaded
    model has its body weights dropped after packing."""
    from tensorslm.constants import HEAD_DENSE

    if release_model_body:   # a serving process: loading's temporaries go back at once
        from tensorslm.rank_store.memory import map_large_allocations

        map_large_allocations()
    if isinstance(model, str):
        from tensorslm.rank_store.models import load_model

        model = load_model(model, body=not release_model_body,
                           table=not release_model_body or store is None or head == HEAD_DENSE)
    embedding = None
    if store is not None:
        from tensorslm.rank_store.embedding import TiedTTHead, TTEmbedding, install
        from tensorslm.rank_store.store import RankStore

        if not isinstance(store, RankStore):
            store = RankStore.open(store)
        if rungs is not None:   # the store's order, so that its first rung is active
            wanted = set(rungs) | ({rescore} if rescore else set())
            rungs = [name for name in store.rung_names if name in wanted] or None
        embedding = TTEmbedding.from_store(store, rungs=rungs)
        # a w8a8 agent's tied head takes int8 activations too: the head at the body's bits
        install(model.model, embedding, **({"head": head} if head else {}), rescore=rescore,
                top_k=top_k, table_sha256=model.table_sha256(),
                int8_activations=precision == "w8a8")
        tied = model.model.get_output_embeddings()
        if isinstance(tied, TiedTTHead):   # now, before the body: the first query does not
            tied.prepared()                # wait for it and the packing's peak is lower
    generator = make_generator(model, embedding, max_prompt_tokens=max_prompt_tokens,
                               model_ref=model_ref, precision=precision, precisions=precisions,
                               store=store, release_model_body=release_model_body)
    return ServingModel(model, store, embedding, generator, AgentActuator(generator))


def control(source: "PowerSource", policy: "Policy | None", actuator: AgentActuator,
            power: "Section | None" = None, **controller_options: Any
            ) -> "tuple[EnergyMeter, Controller | None]":
    """The meter for ``source`` (``power``: the config's ``power:`` section, for its meter
    settings) and, given a policy, the controller that applies it through ``actuator``
    (``controller_options``: ``interval``, ``on_switch``, ... of the Controller)."""
    from tensorslm.controller.decision.control_loop import Controller
    from tensorslm.controller.power.sources import meter_for

    meter = meter_for(source, power) if power is not None else meter_for(source)
    controller = (Controller(source, policy, actuator, **controller_options)
                  if policy is not None else None)
    return meter, controller


def build_agent(config: AgentConfig) -> Agent:
    """Everything from ``agent.yaml``: model (and ladder), power source, meter, policy and
    controller, the query log."""
    from tensorslm.controller.power.energy_meter import EnergyMeter
    from tensorslm.controller.power.power_model import board_model, detect_board

    Notifier().status(f"loading model {config.model.ref}")
    precisions: list[str] = []
    rungs: list[str] | None = None
    if config.policy_path is not None and config.power is not None:
        from tensorslm.controller.decision.policy import load_policy

        # every body precision a point names stays resident (switched between queries); the
        # rungs the points name are loaded now, others at their first switch
        points = load_policy(config.policy_path).points
        precisions = [p.precision for p in points if p.precision is not None]
        rungs = [p.rung for p in points]
    serving = load_serving(config.model.ref, config.model.store, config.model.head,
                           max_prompt_tokens=config.model.max_prompt_tokens,
                           model_ref=config.model.ref, precision=config.model.precision,
                           precisions=precisions, release_model_body=True,
                           rescore=config.model.rescore, rungs=rungs)
    controller = None
    if config.power is not None:
        from tensorslm.controller.decision.policy import load_policy
        from tensorslm.controller.power.sources import open_source, time_acceleration

        policy = (load_policy(config.policy_path, rungs=serving.rungs)
                  if config.policy_path is not None else None)
        # a simulated battery's fast time: dwell, smoothing and the control tick follow it
        acceleration = time_acceleration(config.power)
        if policy is not None:
            policy = policy.accelerated(acceleration)
        meter, controller = control(open_source(config.power), policy, serving.actuator,
                                    config.power, interval=max(0.1, 5.0 / acceleration))
    else:   # no sensor (and so no policy: load_config refuses one): the CPU-time estimate
        meter = EnergyMeter(model=board_model(detect_board()))
    return Agent(device=config.device, broker=config.broker, generator=serving.generator,
                 query_log=QueryLog(config.log_path, config.device), group=config.group,
                 topics=Topics(config.topic_prefix), meter=meter, controller=controller,
                 actuator=serving.actuator, serving=config.serving,
                 model_info={"model": config.model.ref, "store": str(config.model.store)
                             if config.model.store else None})

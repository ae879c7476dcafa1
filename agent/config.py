"""``agent.yaml`` read into validated dataclasses (through :mod:`tensorslm.config_file`, so
every error names the file, the line and the field). See ``deploy/agent.example.yaml``.

Relative paths are resolved against the directory of the config file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tensorslm.config_file import Section, load_section
from tensorslm.constants import BODY_PRECISIONS, DEFAULT_BODY_PRECISION, HEAD_MODES

from .broker_config import BrokerConfig, read_broker
from .topics import DEFAULT_PREFIX, BadTopicName, check_level, check_prefix


@dataclass(frozen=True)
class ModelConfig:
    ref: str                          # tensorslm.rank_store.models.load_model reference (alias or path)
    store: Path | None = None         # rank_store ladder; None serves the dense embedding
    head: str | None = None           # dense | tied: tensorslm.rank_store.embedding.install(head=...)
    max_prompt_tokens: int = 1024
    precision: str = DEFAULT_BODY_PRECISION   # body precision: fp32 | bf16 | int8 | w8a8 | int4
    rescore: str | None = None        # head tied: a finer rung whose greedy output every rung serves (docs/head.md)


@dataclass(frozen=True)
class ServingConfig:
    queue_size: int = 8
    max_prompt_chars: int = 4000
    max_new_tokens: int = 64          # when the request does not say
    max_new_tokens_limit: int = 256   # hard cap: a request asking more is clipped (reply says)
    telemetry_interval_s: float = 30.0
    stream: bool = False              # stream tokens when the request does not say
    drain_timeout_s: float = 60.0     # on SIGTERM: time to finish queued queries


@dataclass(frozen=True)
class AgentConfig:
    device: str
    broker: BrokerConfig
    model: ModelConfig
    log_path: Path
    group: str = "default"
    topic_prefix: str = DEFAULT_PREFIX
    policy_path: Path | None = None
    power: Section | None = None      # handed to tensorslm.controller.power.sources.open_source unchanged
    serving: ServingConfig = ServingConfig()
    source: Path | None = None        # the file this came from


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate ``agent.yaml``; raises ConfigError with file, line and field."""
    root = load_section(path)
    base = Path(path).resolve().parent

    def resolve(value: str | None) -> Path | None:
        return None if value is None else (base / Path(value).expanduser())

    def level(sec: Section, key: str, kind: str, default=None) -> str:
        value = sec.str(key, default) if default is not None else sec.str(key)
        try:
            return check_level(kind, value)
        except BadTopicName as exc:
            raise sec.field_error(key, str(exc)) from None

    device = level(root, "device", "device id")
    group = level(root, "group", "group", "default")
    prefix = root.str("prefix", DEFAULT_PREFIX)
    try:
        check_prefix(prefix)
    except BadTopicName as exc:
        raise root.field_error("prefix", str(exc)) from None

    broker = _broker(root.section("broker"), resolve, device)

    model_sec = root.section("model")
    model = ModelConfig(ref=model_sec.str("ref"), store=resolve(model_sec.str("store", None)),
                        head=model_sec.choice("head", HEAD_MODES, None),
                        max_prompt_tokens=model_sec.int("max_prompt_tokens", 1024, minimum=1),
                        precision=model_sec.choice("precision", BODY_PRECISIONS,
                                                   DEFAULT_BODY_PRECISION),
                        rescore=model_sec.str("rescore", None))
    model_sec.reject_unknown()

    serving_sec = root.section("serving", None)
    serving = ServingConfig()
    if serving_sec is not None:
        serving = ServingConfig(
            queue_size=serving_sec.int("queue_size", 8, minimum=1, maximum=10000),
            max_prompt_chars=serving_sec.int("max_prompt_chars", 4000, minimum=1),
            max_new_tokens=serving_sec.int("max_new_tokens", 64, minimum=1, maximum=4096),
            max_new_tokens_limit=serving_sec.int("max_new_tokens_limit", 256, minimum=1,
                                                 maximum=4096),
            telemetry_interval_s=serving_sec.float("telemetry_interval_s", 30.0, minimum=0.1),
            stream=serving_sec.bool("stream", False),
            drain_timeout_s=serving_sec.float("drain_timeout_s", 60.0, minimum=0))
        if serving.max_new_tokens > serving.max_new_tokens_limit:
            raise serving_sec.field_error(
                "max_new_tokens", f"expected at most max_new_tokens_limit "
                f"({serving.max_new_tokens_limit}), got {serving.max_new_tokens}")
        serving_sec.reject_unknown()

    policy_path = resolve(root.str("policy", None))
    power = root.section("power", None)
    if policy_path is not None:
        if power is None:
            raise root.field_error("policy", f"the energy policy {policy_path} needs a power: "
                                             "section (the source it decides from); add power: "
                                             "or remove policy:")
        from tensorslm.controller.decision.policy import load_policy

        load_policy(policy_path)   # every configured file is checked now, not at first use
    config = AgentConfig(device=device, broker=broker, model=model,
                         log_path=resolve(root.str("log")), group=group, topic_prefix=prefix,
                         policy_path=policy_path, power=power, serving=serving,
                         source=Path(path))
    root.reject_unknown()
    return config


def _broker(sec: Section, resolve, device: str) -> BrokerConfig:
    """The shared broker keys (tensorslm.agent.broker_config) plus the agent's own: ``protocol``."""
    return read_broker(sec, resolve, client_id=f"tensorslm-agent-{device}", reconnect_max_s=30.0,
                       protocol_key=True)

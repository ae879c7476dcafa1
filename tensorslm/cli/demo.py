"""``tensorslm demo``: the first run of a newcomer, on one machine, nothing set up beforehand.

1. The ladder: SmolLM2-135M (from its PyPI wheel) is compressed once, at every rung the
   policy serves (and any ``--ladder`` adds), and cached; when WikiText-2 is beside the repo the
   fp32 reference and each rung are evaluated once on its first ``eval_tokens`` tokens (kept
   in the store's manifest); the ladder table is printed and its plot saved. The agent's
   default ``w8a8`` body is stored beside it once, calibrated on a short text the model writes
   itself (:func:`prepare_body`).
2. A broker: amqtt inside this process (MQTT 3.1.1), or a broker you name (``--broker``).
3. The agent: the real daemon serving the model with the ladder installed, a simulated
   battery read through the real INA219 driver and drained by this process's CPU load
   (estimated with the Raspberry Pi 4 power model) ``acceleration`` times faster than life,
   the example energy policy switching the operating point, every query logged to SQLite.
4. A stream of prompts sent over MQTT like ``tensorslm ask`` does, shown live (in a terminal)
   or a line per answer (in a log or a pipe); it ends by itself after ``prompts`` prompts or
   when the battery is empty, prints the cost of each operating point per query and per
   token, and where the query log is.

Time runs ``acceleration`` times faster for the battery, so the policy's dwell and smoothing
times are divided by the same factor: the policy behaves as it would over a real discharge.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .demo_view import DemoState, QueryRow, SwitchRow, render
from tensorslm.agent.errors import AgentError
from tensorslm.constants import HEAD_TIED
from tensorslm.shipped import shipped_file

log = logging.getLogger(__name__)

DEFAULT_POLICY = shipped_file("policies/battery.yaml")
# The evaluation text: WikiText-2's test split beside a checkout (../shared/data), if present.
DEFAULT_TEXT = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2-raw"
                / "wiki.test.raw")
DEVICE = "demo-pi"

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for saving energy at home.",
    "Explain what a battery does in one sentence.",
    "Write a haiku about a Raspberry Pi.",
    "What is 12 times 7?",
    "Name three planets of the solar system.",
    "How do plants make their food?",
    "Suggest a name for a small robot.",
    "What is the boiling point of water in Celsius?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "List two benefits of walking every day.",
    "What does a thermometer measure?",
    "Give a one-line definition of electricity.",
    "What colour do you get by mixing blue and yellow?",
    "Describe a cat in five words.",
]


class DemoError(AgentError, RuntimeError):
    """The demo could not run (a part failed to start)."""


@dataclass
class DemoOptions:
    model: str = "smollm2-135m"
    prompts: int = 12
    max_new_tokens: int = 32             # asked by each prompt; the operating point caps it
    workdir: Path = Path.home() / ".cache" / "tensorslm" / "demo"
    policy: Path = DEFAULT_POLICY
    text: Path | None = DEFAULT_TEXT      # None or missing: the ladder is not evaluated
    eval_tokens: int = 1024               # a sample: enough to tell the rungs apart
    broker: str | None = None             # None: amqtt in this process
    battery_wh: float = 6.0
    start_percent: float = 66.0
    acceleration: float = 150.0
    board: str = "raspberry-pi-4"
    head: str = HEAD_TIED                 # how the LM head uses the rung; evaluated and served alike
    ladder_specs: str | None = None       # recipes besides the policy's rungs (default_specs)
    live: bool = True
    query_timeout: float = 300.0


@dataclass
class DemoSummary:
    log_path: Path
    store_dir: Path
    plot: Path | None
    queries: list[dict] = field(default_factory=list)
    switches: list[dict] = field(default_factory=list)
    battery_start: float | None = None
    battery_end: float | None = None
    broker: str = ""


# The rung built when the policy serves none: per-row int8 on the measured frontier
# (bench/results/frontier.md), so the ladder always shows one compressed rung.
FALLBACK_LADDER = "auto-4"


def default_specs(text: str | None = None, policy: Path | None = None):
    """The rung specs of the demo ladder: the recipes given (``--ladder``, e.g. ``auto-8,tt-6x8``),
    then every rung the policy at ``policy`` serves that they lack, and nothing else: the demo
    builds and evaluates only what it can serve. ``FALLBACK_LADDER`` when that leaves none."""
    from tensorslm.constants import FULL_RUNG
    from tensorslm.controller.decision.policy import load_policy
    from tensorslm.rank_store.rung_spec import parse_rung_specs

    recipes = [item.strip() for item in (text or "").split(",") if item.strip()]
    if policy is not None:
        for point in load_policy(policy).points:
            if point.rung != FULL_RUNG and point.rung not in recipes:
                recipes.append(point.rung)
    return parse_rung_specs(recipes=",".join(recipes) or FALLBACK_LADDER)


def evaluated_tokens(store: Any, head: str) -> int | None:
    """Tokens the recorded perplexities of ``head`` were measured on, if every rung (and the
    dense reference under ``full``) has one; ``None`` when the ladder still needs evaluating."""
    tokens = set()
    for name in store.rung_names:
        entry = store.info(name).results.get(head)
        if not isinstance(entry, dict) or "perplexity" not in entry:
            return None
        tokens.add(int(entry.get("tokens", 0)))
    return min(tokens) if tokens else None


def prepare_ladder(options: DemoOptions, loaded: Any, say: Callable[[Any], None]):
    """Build the store once (cached in the workdir), evaluate it once (results cached in its
    manifest), show the table."""
    from tensorslm.rank_store.errors import RankStoreError
    from tensorslm.rank_store.ladder import build_ladder, default_plot_path, evaluate_ladder, ladder_table
    from tensorslm.rank_store.store import RankStore

    store_dir = options.workdir / f"{loaded.name}-ladder"
    specs = default_specs(options.ladder_specs, options.policy)
    wanted = {spec.name for spec in specs}
    store = None
    if store_dir.exists():
        try:
            store = RankStore.open(store_dir, expect_source=loaded.source)
            if not wanted <= set(store.rung_names):
                say(f"cached ladder at {store_dir} lacks rungs {sorted(wanted - set(store.rung_names))}; rebuilding")
                store = None
        except RankStoreError as exc:
            say(f"cached ladder at {store_dir} is not usable ({exc}); rebuilding")
            store = None
    if store is None:
        say(f"compressing the {loaded.name} embedding at {len(specs)} rungs "
            f"({', '.join(s.name for s in specs)}) into {store_dir}")
        started = time.perf_counter()
        store = build_ladder(loaded.ref, store_dir, specs, loaded=loaded, overwrite=True)
        say(f"compressed in {time.perf_counter() - started:.1f} s")
    else:
        say(f"the ladder ({', '.join(store.rung_names)}) from the cache at {store_dir}")
    head = options.head
    plot = default_plot_path(store_dir, head)
    text = Path(options.text) if options.text is not None else None
    tokens = evaluated_tokens(store, head)
    if tokens is None and text is not None and text.is_file():
        say(f"evaluating the fp32 reference and every rung on the first {options.eval_tokens} "
            f"tokens of {text.name}, head {head} (once: the results are kept in the manifest)")
        started = time.perf_counter()
        report = evaluate_ladder(store_dir, text, tokens=options.eval_tokens, head=head,
                                 loaded=loaded, baselines=("fp32",))
        say(f"evaluated in {time.perf_counter() - started:.1f} s")
        plot, tokens = report.plot, report.tokens
        store = RankStore.open(store_dir)
    elif tokens is None:
        say(f"no evaluation text at {text}; the ladder is shown without perplexity")
    say(ladder_table(store))
    if tokens is not None:
        say(f"perplexity: first {tokens} tokens of the evaluation text, head {head}; a short "
            f"sample, for comparing the rungs with each other (more tokens and the quantisation "
            f"baselines: tensorslm evaluate {store_dir} --text FILE --tokens 8192)")
    if plot.exists():
        say(f"perplexity against embedding bytes: {plot}")
    return store, (plot if plot.exists() else None)


def prepare_body(store: Any, loaded: Any, precisions: list[str], say: Callable[[Any], None]) -> None:
    """Keep a calibrated ``w8a8`` body in the demo's store when the agent serves one (the
    default): its input scales from a short sample the model writes itself
    (:data:`~tensorslm.rank_store.smoothing.SHORT_SELF_CALIBRATION`, about ten seconds here,
    once; ``tensorslm compress`` takes eight times as many tokens). Without it the agent
    quantises the body at start-up with no input scales, about +1% perplexity on SmolLM2."""
    from tensorslm.constants import DEFAULT_BODY_PRECISION
    from tensorslm.rank_store.body import store_body
    from tensorslm.rank_store.smoothing import SHORT_SELF_CALIBRATION, self_calibration_of

    if "w8a8" not in {DEFAULT_BODY_PRECISION, *precisions} or "w8a8" in store.body_precisions:
        return
    sequences, length = SHORT_SELF_CALIBRATION
    say(f"calibrating the w8a8 body on {sequences} x {length} tokens {loaded.name} writes itself "
        f"(once: kept in the store)")
    started = time.perf_counter()
    ids = self_calibration_of(loaded, sequences=sequences, length=length, progress=True)
    store_body(store, loaded.model, "w8a8", calibration=ids, self_written=True)
    say(f"calibrated and stored in {time.perf_counter() - started:.1f} s")


def run_demo(options: DemoOptions, console: Any = None) -> DemoSummary:
    """Run the whole demo; returns what happened (the query log keeps every record)."""
    from rich.console import Console
    from rich.live import Live

    from tensorslm.controller.decision.policy import load_policy
    from tensorslm.controller.power.power_model import board_model
    from tensorslm.controller.power.simulated_battery import LoadEstimate, SimulatedBattery, SimulatedBatterySource
    from tensorslm.rank_store.models import load_model

    from tensorslm.agent.client import AskClient
    from tensorslm.agent.config import ServingConfig
    from tensorslm.agent.broker_config import BrokerConfig, MqttProtocol
    from tensorslm.agent.daemon import Agent
    from .embedded_broker import EmbeddedBroker
    from tensorslm.agent.query_log import QueryLog
    from tensorslm.agent.topics import Topics
    from tensorslm.agent.wiring import control, load_serving

    console = console or Console()
    say = console.print
    options.workdir.mkdir(parents=True, exist_ok=True)

    console.rule("1. the model and its ladder")
    loaded = load_model(options.model)
    say(f"{loaded.name}: loaded in {loaded.load_seconds:.1f} s"
        f"{' (from the fp32 cache)' if loaded.from_cache else ' (converted from GGUF once)'}")
    store, plot = prepare_ladder(options, loaded, say)

    # every body precision a point names stays resident, as `tensorslm serve` keeps it
    precisions = [p.precision for p in load_policy(options.policy).points if p.precision is not None]
    prepare_body(store, loaded, precisions, say)
    serving = load_serving(loaded, store, options.head, model_ref=options.model, precisions=precisions)
    generator, actuator = serving.generator, serving.actuator
    policy = load_policy(options.policy, rungs=serving.rungs)
    # Battery time runs `acceleration` times faster: so do the policy's dwell and smoothing.
    policy = policy.accelerated(options.acceleration)

    battery = SimulatedBattery(capacity_wh=options.battery_wh, soc_percent=options.start_percent,
                               load=LoadEstimate(board_model(options.board), scope="process"),
                               acceleration=options.acceleration)
    source = SimulatedBatterySource(battery)
    state = DemoState(title=f"tensorslm demo: {loaded.name} on a simulated {options.board} "
                            f"battery ({options.battery_wh:g} Wh, time x{options.acceleration:g})")
    started = time.monotonic()

    def on_switch(switch: Any) -> None:
        with state.lock:
            state.switches.append(SwitchRow(time.monotonic() - started, switch.from_point or "–",
                                            switch.to_point, switch.reason))

    meter, controller = control(source, policy, actuator, interval=0.25, on_switch=on_switch)
    log_path = options.workdir / "queries.db"
    query_log = QueryLog(log_path, DEVICE)

    console.rule("2. the broker and the agent")
    embedded = None
    if options.broker is None:
        embedded = EmbeddedBroker().start()
        broker = BrokerConfig.from_url(embedded.url, protocol=MqttProtocol.V311)
        say(f"embedded MQTT broker (amqtt, MQTT 3.1.1) on {embedded.url}")
    else:
        broker = BrokerConfig.from_url(options.broker)
        say(f"using the broker at {broker.url} (MQTT {broker.protocol})")
    topics = Topics()
    agent = Agent(device=DEVICE, broker=broker, generator=generator, query_log=query_log,
                  topics=topics, meter=meter, controller=controller, actuator=actuator,
                  serving=ServingConfig(queue_size=4, max_new_tokens=options.max_new_tokens,
                                        telemetry_interval_s=2.0, stream=True),
                  model_info={"model": options.model, "store": str(store.path)},
                  reconnect_delay=(0.2, 2.0))
    summary = DemoSummary(log_path=log_path, store_dir=Path(store.path), plot=plot,
                          broker=broker.url)
    run_started = time.time()   # the log keeps earlier runs too; the summary is this run's
    try:
        controller.start()
        agent.start()
        if not agent.ready.wait(30):
            raise DemoError(f"the agent did not subscribe at {broker.url} within 30 s")
        say(f"agent '{DEVICE}' serving; policy {options.policy.name}: "
            f"{', '.join(p.describe() for p in policy.points)}")
        summary.battery_start = battery.soc_percent

        console.rule(f"3. {options.prompts} prompts over MQTT")
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(options.prompts)]
        with AskClient(broker, topics=topics, client_id="demo-client") as client:
            refresh = threading.Event()
            interactive = options.live and console.is_terminal and not console.is_dumb_terminal

            def refresh_state() -> None:
                reading = controller.latest_reading
                point = actuator.active or controller.current_point
                with state.lock:
                    state.battery_percent = battery.soc_percent
                    state.watts = getattr(reading, "watts", None)
                    state.point = point.name if point else None
                    state.rung = getattr(generator, "rung", None)

            if interactive:
                with Live(render(state), console=console, refresh_per_second=4,
                          transient=True) as live:
                    def painter() -> None:
                        while not refresh.wait(0.25):
                            refresh_state()
                            live.update(render(state))

                    paint = threading.Thread(target=painter, name="demo-view", daemon=True)
                    paint.start()
                    try:
                        _serve(client, prompts, options, state, battery)
                    finally:
                        refresh.set()
                        paint.join(2)
            else:
                # A log or a pipe: a line per answer as it comes.
                _serve(client, prompts, options, state, battery,
                       on_answer=lambda i, row: say(_answer_line(i, len(prompts), row)))
            # The whole view once more, every prompt and answer in full.
            refresh_state()
            say(render(state, max_rows=None, wrap=True))
        say("")
        summary.battery_end = battery.soc_percent
    finally:
        agent.stop()
        agent.join(30)
        controller.stop()
        source.close()
        if embedded is not None:
            embedded.stop()
    reader = QueryLog(log_path, DEVICE)
    try:
        summary.queries = [q for q in reader.queries() if q["received_at"] >= run_started]
        summary.switches = [w for w in reader.switches() if w["time"] >= run_started]
    finally:
        reader.close()
    console.rule("4. what it cost")
    say(summary_table(summary))
    say(f"every query and switch is in the SQLite query log: {log_path}")
    say("  browse it:  sqlite3 " + str(log_path) + " 'select * from queries'")
    return summary


def _serve(client: Any, prompts: list[str], options: DemoOptions, state: DemoState, battery: Any,
           on_answer: Callable[[int, QueryRow], None] | None = None) -> None:
    """Send the prompts one after the other as chat messages, until the battery is empty."""
    for index, prompt in enumerate(prompts, start=1):
        if battery.empty:
            with state.lock:
                state.note = "the battery is empty: the demo stops here"
            break
        row = QueryRow(prompt, outcome="streaming")
        with state.lock:
            state.queries.append(row)
        # A chat message: the Instruct model answers it through its template.
        answer = client.ask(messages=[{"role": "user", "content": prompt}],
                            device=DEVICE, timeout=options.query_timeout,
                            max_new_tokens=options.max_new_tokens,
                            on_token=lambda text, row=row: _append(state, row, text))
        _finish(state, row, answer)
        if on_answer is not None:
            on_answer(index, row)


def _answer_line(index: int, total: int, row: QueryRow) -> str:
    energy = "–" if row.joules is None else f"{row.joules:.2f} J ({row.method})"
    return (f"prompt {index}/{total}: {row.outcome}, {row.output_tokens or 0} tokens in "
            f"{row.seconds or 0:.1f} s, {energy}, point {row.point or '–'} (rung {row.rung or '–'})")


def _append(state: DemoState, row: QueryRow, text: str) -> None:
    with state.lock:
        row.answer += text


def _finish(state: DemoState, row: QueryRow, answer: Any) -> None:
    body = answer.body
    with state.lock:
        row.outcome = "ok" if answer.ok else body.get("code", "error")
        row.answer = answer.text if answer.ok else body.get("message", "")
        row.output_tokens = body.get("output_tokens")
        row.seconds = body.get("latency_s")
        energy = body.get("energy") or {}
        row.joules = energy.get("joules")
        row.method = energy.get("method")
        row.point = body.get("operating_point")
        row.rung = body.get("rung")


def summary_table(summary: DemoSummary):
    """Per operating point: queries, mean tokens, seconds and joules per query, joules per token;
    the energy method in the caption."""
    from rich.table import Table

    methods = sorted({r["energy_method"] for r in summary.queries if r.get("energy_method")})
    caption = f"energy method: {', '.join(methods) or '–'}"
    if methods == ["simulated"]:
        caption += (" (a battery model drained by a Raspberry Pi 4 power model of this process's "
                    "CPU time: it shows the mechanism, it does not measure a Pi)")
    table = Table(title=f"battery {summary.battery_start or 0:.1f}% → {summary.battery_end or 0:.1f}%, "
                        f"{len(summary.switches)} operating-point switches", caption=caption)
    for name in ("point", "rung", "queries", "tokens/query", "s/query", "J/query", "J/token"):
        table.add_column(name, justify="left" if name in ("point", "rung") else "right",
                         overflow="fold")
    groups: dict[str, list[dict]] = {}
    for row in summary.queries:
        if row.get("outcome") == "ok":
            groups.setdefault(row.get("operating_point") or "–", []).append(row)
    for point, rows in groups.items():
        n = len(rows)
        tokens = sum(r["output_tokens"] or 0 for r in rows)
        metered = [r for r in rows if r["energy_j"] is not None]   # a query can lack energy
        joules = sum(r["energy_j"] for r in metered)
        metered_tokens = sum(r["output_tokens"] or 0 for r in metered)
        table.add_row(point, ", ".join(sorted({r["rung"] or "–" for r in rows})), str(n),
                      f"{tokens / n:.1f}", f"{sum(r['latency_s'] or 0 for r in rows) / n:.2f}",
                      f"{joules / len(metered):.2f}" if metered else "–",
                      f"{joules / metered_tokens:.3f}" if metered and metered_tokens else "–")
    return table

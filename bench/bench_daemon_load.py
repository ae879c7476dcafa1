"""The real agent under load: sustained queries per minute with the queue kept full, and the
daemon's resident memory at each rung.

    python bench/bench_daemon_load.py [--policy deploy/policies/battery.yaml] [--seconds 90]
        [--ranks 6x8,4x6,4x4] [--store DIR] [--head tied] [--board raspberry-pi-4]

A real mosquitto (tests/brokers.py) on a free loopback port, and the real ``tensorslm.agent.daemon.Agent``
serving SmolLM2-135M with the ladder installed (as ``build_agent`` does: every rung of the
store loaded, head ``--head``), an ``EnergyMeter`` on the ``--board`` model, and an
``AgentActuator``. This process is the daemon, so its RSS is the daemon's.

* Throughput: for each point of ``--policy``, the point is applied, then a client keeps
  ``queue_size`` requests outstanding (one new request per answer, each asking
  ``--max-new-tokens``, within the point's cap) for ``--seconds``; requests still queued at
  the end expire. Answers and tokens per minute (over the time to the last answer) and the
  median joules per answer (estimated) are printed.
* Memory: for each rung of the store, the rung is applied, one query is served, and VmRSS is
  read from /proc/self/status (VmHWM too: the peak so far).

The machine is shared with other work (2 cores): queries per minute are a floor.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from tensorslm.constants import HEAD_MODES, HEAD_TIED

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

log = logging.getLogger("bench_daemon_load")


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class LoadClient:
    """Keeps ``depth`` requests outstanding against one device until stopped."""

    def __init__(self, client: Any, device: str, prompts: Sequence[str], depth: int,
                 max_new_tokens: int) -> None:
        self.client = client
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.prompts = prompts
        self.depth = depth
        self.answers: list[tuple[float, dict]] = []   # (time, final body)
        self._sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Condition(self._lock)
        self.deadline = 0.0

    def _send(self) -> None:
        prompt = self.prompts[self._sent % len(self.prompts)]
        self._sent += 1
        self.client.send({"messages": [{"role": "user", "content": prompt}],
                          "deadline": self.deadline, "max_new_tokens": self.max_new_tokens}, device=self.device,
                         on_message=self._on_message)

    def _on_message(self, message: Any) -> None:
        if not message.final:
            return
        with self._lock:
            self.answers.append((time.monotonic(), {**message.body, "type": message.type.value}))
            self._done.notify_all()
        if not self._stop.is_set():
            self._send()

    def run(self, seconds: float) -> list[tuple[float, dict]]:
        """Requests carry a deadline at the end of the run, so what is still queued then is
        answered ``expired`` at once instead of being served late."""
        self.deadline = time.time() + seconds
        for _ in range(self.depth):
            self._send()
        time.sleep(seconds)
        self._stop.set()
        return list(self.answers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, default=ROOT / "deploy" / "policies" / "battery.yaml")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ranks", default="6x8,4x6,4x4")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--head", default=HEAD_TIED, choices=HEAD_MODES)
    parser.add_argument("--board", default="raspberry-pi-4")
    parser.add_argument("--seconds", type=float, default=90.0, help="load duration per point")
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="asked by every load request (the point's cap still applies)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    command = (f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ
               else "") + "python bench/bench_daemon_load.py " + " ".join(sys.argv[1:] if argv is None else argv)

    import torch

    from tensorslm.agent.client import AskClient
    from tensorslm.agent.config import ServingConfig
    from tensorslm.agent.broker_config import BrokerConfig
    from tensorslm.agent.daemon import Agent
    from tensorslm.agent.protocol import MessageType
    from tensorslm.agent.query_log import QueryLog
    from tensorslm.agent.wiring import load_serving
    from bench_operating_points import DEFAULT_STORE, PROMPTS, open_ladder
    from tensorslm.controller.power.energy_meter import EnergyMeter
    from tensorslm.controller.decision.operating_point import OperatingPoint
    from tensorslm.controller.decision.policy import load_policy
    from tensorslm.controller.power.power_model import board_model
    from tensorslm.rank_store.models import load_model
    from tests.brokers import Broker

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so the broker is stopped
    torch.set_grad_enabled(False)
    rss_start = status_mib("VmRSS")
    store = open_ladder(load_model(args.model), args.store or DEFAULT_STORE, args.ranks)
    serving = load_serving(args.model, store, args.head)   # what `tensorslm serve` builds
    generator, actuator = serving.generator, serving.actuator
    policy = load_policy(args.policy, rungs=serving.rungs)
    rss_loaded = status_mib("VmRSS")
    meter = EnergyMeter(model=board_model(args.board), sampler=False)
    results: dict[str, Any] = {"command": command, "points": [], "rss": []}
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        broker = Broker.start(Path(tmp) / "broker")
        agent = Agent(device="bench-pi", broker=BrokerConfig.from_url(broker.url, client_id="agent-bench"),
                      generator=generator, query_log=QueryLog(Path(tmp) / "q.db", "bench-pi"),
                      meter=meter, actuator=actuator,
                      serving=ServingConfig(queue_size=args.queue_size, max_new_tokens=256),
                      tick_s=0.1)
        agent.start()
        client = AskClient(BrokerConfig.from_url(broker.url)).__enter__()
        try:
            if not agent.ready.wait(30):
                raise RuntimeError("the agent did not become ready")
            # memory at each rung: apply, serve one query, read RSS
            for rung in serving.rungs:
                actuator.apply(OperatingPoint(name=f"rung-{rung}", rung=rung, threads=1,
                                              max_new_tokens=32))
                answer = client.ask(messages=[{"role": "user", "content": PROMPTS[0]}],
                                    device="bench-pi", timeout=300)
                row = {"rung": rung, "rss_mib": status_mib("VmRSS"), "hwm_mib": status_mib("VmHWM"),
                       "ok": answer.ok, "rung_bytes": store.info(rung).nbytes}
                results["rss"].append(row)
                print(f"rung {rung:>8}: RSS {row['rss_mib']:.0f} MiB (peak {row['hwm_mib']:.0f}), "
                      f"rung file {row['rung_bytes'] / 2**20:.1f} MiB", flush=True)
            # throughput at each point with the queue kept full
            for point in policy.points:
                actuator.apply(point)
                load = LoadClient(client, "bench-pi", PROMPTS, args.queue_size, args.max_new_tokens)
                started = time.monotonic()
                answers = load.run(args.seconds)
                # drain: the one query in progress finishes, the queued ones expire
                deadline = time.monotonic() + 900
                while agent.queue_depth and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(1.0)
                answers = list(load.answers)
                ok = [b for _, b in answers if b["type"] == MessageType.REPLY.value]
                busy = len(answers) - len(ok)
                joules = [b["energy"]["joules"] for b in ok if b.get("energy")]
                tokens = [b.get("output_tokens", 0) for b in ok]
                # the rate over the time to the last answer (the in-flight query at the end
                # of the window finishes late and is counted)
                span = max((t for t, b in answers if b["type"] == MessageType.REPLY.value),
                           default=started + args.seconds) - started
                row = {"point": point.name, "seconds": span, "answered": len(ok),
                       "refused": busy, "per_minute": 60 * len(ok) / span,
                       "median_joules": statistics.median(joules) if joules else None,
                       "median_output_tokens": statistics.median(tokens) if tokens else None,
                       "tokens_per_minute": 60 * sum(tokens) / span}
                results["points"].append(row)
                print(f"point {point.name:>9}: {row['per_minute']:.1f} answers/min, "
                      f"{row['tokens_per_minute']:.0f} tokens/min, median "
                      f"{row['median_output_tokens']} tokens, {row['median_joules']:.1f} J "
                      f"(estimated, {args.board}), over {span:.0f} s; {busy} expired/busy replies", flush=True)
        finally:
            client.close()
            agent.stop()
            agent.join(30)
            broker.stop()
    print(f"RSS at start {rss_start:.0f} MiB, after loading model + ladder {rss_loaded:.0f} MiB")
    print(json.dumps(results, indent=1))
    print(f"command: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

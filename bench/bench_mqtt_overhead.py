"""MQTT overhead per query: the agent over a real mosquitto against calling the generator.

    python bench/bench_mqtt_overhead.py                       # tiny random Llama (tests/tiny_model.py)
    python bench/bench_mqtt_overhead.py --model smollm2-135m  # tensorslm.rank_store.models.load_model

Both paths run the same greedy request (same prompt, ``--tokens`` new tokens) on the same
model object in this process, alternating direct and MQTT queries so that drift (other load
on the machine) hits both alike. The MQTT time is the client's round trip: publish the
request (QoS 1), the agent validates it, commits it to the query log, meters it, generates,
commits the result, publishes tokens (if streaming) and the reply (QoS 1), and the client
receives the final reply. Overhead = median(MQTT) / median(direct) - 1.

On a shared, overloaded machine wall time mostly measures the other processes, so CPU time
is reported too: this process's CPU seconds per query (agent, client and paho threads
included) plus mosquitto's (from /proc/<pid>/stat), against the direct call's CPU seconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tensorslm.agent.client import AskClient  # noqa: E402
from tensorslm.agent.config import ServingConfig  # noqa: E402
from tensorslm.agent.broker_config import BrokerConfig  # noqa: E402
from tensorslm.agent.daemon import Agent  # noqa: E402
from tensorslm.agent.generation import HFGenerator  # noqa: E402
from tensorslm.agent.protocol import parse_request  # noqa: E402
from tensorslm.agent.query_log import QueryLog  # noqa: E402
from tensorslm.controller.power.energy_meter import EnergyMeter  # noqa: E402
from tensorslm.controller.power.power_model import BOARDS  # noqa: E402
from tests.brokers import Broker  # noqa: E402

def broker_cpu_s(broker: Broker) -> float:
    """mosquitto's user + system CPU seconds so far."""
    import os

    fields = Path(f"/proc/{broker.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PROMPT = "the small model runs on a raspberry pi and energy per query is measured in joules"


def load(model_ref: str | None):
    if model_ref is None:
        from tests.tiny_model import tiny_model

        model, tokenizer = tiny_model()
        return model, tokenizer, "tiny-llama (2 layers, d=32, random)"
    from tensorslm.rank_store.models import load_model

    loaded = load_model(model_ref)
    return loaded.model, loaded.tokenizer, loaded.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="rank_store model ref (default: the tiny test model)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--queries", type=int, default=20, help="per path")
    parser.add_argument("--stream", action="store_true", help="stream tokens over MQTT too")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, name = load(args.model)
    generator = HFGenerator(model, tokenizer, model_ref=args.model or "tiny")
    request = parse_request(json.dumps({"prompt": PROMPT}).encode(), received_at=time.time(),
                            max_prompt_chars=10_000)
    work = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    broker = Broker.start(work / "broker")
    agent = Agent(device="bench", broker=BrokerConfig.from_url(broker.url), generator=generator,
                  query_log=QueryLog(work / "queries.db", "bench"),
                  meter=EnergyMeter(model=BOARDS["raspberry-pi-4"]),
                  serving=ServingConfig(max_new_tokens=args.tokens, max_prompt_chars=10_000,
                                        stream=args.stream)).start()
    try:
        if not agent.ready.wait(10):
            raise SystemExit("the agent did not connect to mosquitto")
        with AskClient(BrokerConfig.from_url(broker.url)) as client:
            for _ in range(2):   # warm-up both paths
                generator.generate(request, max_new_tokens=args.tokens)
                client.ask(PROMPT, device="bench", max_new_tokens=args.tokens, timeout=300)
            direct, mqtt, tokens = [], [], set()
            direct_cpu, mqtt_cpu = [], []
            for _ in range(args.queries):
                t0, c0 = time.perf_counter(), time.process_time()
                result = generator.generate(request, max_new_tokens=args.tokens)
                direct.append(time.perf_counter() - t0)
                direct_cpu.append(time.process_time() - c0)
                t0, c0, b0 = time.perf_counter(), time.process_time(), broker_cpu_s(broker)
                answer = client.ask(PROMPT, device="bench", max_new_tokens=args.tokens,
                                    timeout=300, stream=args.stream)
                mqtt.append(time.perf_counter() - t0)
                mqtt_cpu.append(time.process_time() - c0 + broker_cpu_s(broker) - b0)
                if not answer.ok:
                    raise SystemExit(f"the agent answered {answer.body}")
                tokens.add((result.output_tokens, answer.body["output_tokens"]))
    finally:
        agent.stop()
        agent.join(30)
        broker.stop()
    d, m = statistics.median(direct), statistics.median(mqtt)
    dc, mc = statistics.mean(direct_cpu), statistics.mean(mqtt_cpu)
    figures = {
        "model": name, "new_tokens": sorted(tokens), "queries": args.queries,
        "stream": args.stream, "torch_threads": torch.get_num_threads(),
        "direct_median_s": round(d, 5), "mqtt_median_s": round(m, 5),
        "overhead_s": round(m - d, 5), "overhead_percent": round(100 * (m / d - 1), 2),
        "direct_cpu_mean_s": round(dc, 5), "mqtt_cpu_mean_s": round(mc, 5),
        "cpu_overhead_s": round(mc - dc, 5), "cpu_overhead_percent": round(100 * (mc / dc - 1), 2),
        "load_average": list(__import__("os").getloadavg()),
    }
    print(f"model {name}, {args.tokens} new tokens, {args.queries} queries per path, "
          f"stream={args.stream}")
    print(f"  direct generate(): median {d * 1000:8.1f} ms")
    print(f"  over MQTT (agent): median {m * 1000:8.1f} ms")
    print(f"  overhead:          {1000 * (m - d):8.1f} ms per query = "
          f"{figures['overhead_percent']:.1f} %")
    print(f"  CPU per query:     direct {dc * 1000:.1f} ms, MQTT path incl. mosquitto "
          f"{mc * 1000:.1f} ms: overhead {1000 * (mc - dc):.1f} ms = "
          f"{figures['cpu_overhead_percent']:.1f} %")
    print(f"  load average {figures['load_average'][0]:.1f} on {__import__('os').cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

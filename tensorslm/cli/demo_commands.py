"""``tensorslm demo``: the first run, on one machine with nothing set up beforehand."""
from __future__ import annotations

from pathlib import Path

import click

from .errors import library_errors
from tensorslm.constants import HEAD_MODES, HEAD_TIED


@click.command()
@click.option("--prompts", default=12, show_default=True, type=click.IntRange(1, 500),
              help="How many prompts to send before the demo ends by itself.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 1024),
              help="Tokens asked per prompt (the operating point may cap it lower).")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model alias or path.")
@click.option("--ladder", "ladder_specs", default=None,
              help="Rungs to build besides the ones the policy serves, e.g. auto-8,tt-6x8 "
                   "(default: none; auto-4 when the policy serves no compressed rung).")
@click.option("--policy", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Energy policy YAML (default: deploy/policies/battery.yaml).")
@click.option("--broker", default=None,
              help="Broker URL, e.g. mqtt://127.0.0.1:1883 for mosquitto (default: amqtt in process).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the ladder cache and the query log go (default: ~/.cache/tensorslm/demo).")
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Text to evaluate the ladder on (default: WikiText-2 test text beside the repo).")
@click.option("--head", type=click.Choice(HEAD_MODES), default=HEAD_TIED, show_default=True,
              help="dense: the LM head keeps the original matrix; tied: it is computed from the "
                   "active rung (evaluated and served alike).")
@click.option("--eval-tokens", default=1024, show_default=True, type=click.IntRange(64),
              help="Tokens of the text each rung is evaluated on (once; kept in the manifest).")
@click.option("--battery-wh", default=6.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Capacity of the simulated battery.")
@click.option("--start-percent", default=66.0, show_default=True, type=click.FloatRange(1, 100),
              help="Charge of the simulated battery at the start.")
@click.option("--acceleration", default=150.0, show_default=True, type=click.FloatRange(min=1),
              help="How much faster than life the battery drains.")
@library_errors
def demo(prompts, max_new_tokens, model, ladder_specs, policy, broker, workdir, text, head,
         eval_tokens, battery_wh, start_percent, acceleration) -> None:
    """Compress SmolLM2's embedding, serve it over MQTT on a draining simulated battery, and
    watch the energy policy switch operating points, live."""
    from tensorslm.cli.demo import DemoOptions, run_demo

    options = DemoOptions(prompts=prompts, max_new_tokens=max_new_tokens, model=model,
                          ladder_specs=ladder_specs, broker=broker, head=head,
                          eval_tokens=eval_tokens,
                          battery_wh=battery_wh,
                          start_percent=start_percent, acceleration=acceleration)
    if policy is not None:
        options.policy = policy
    if workdir is not None:
        options.workdir = workdir
    if text is not None:
        options.text = text
    run_demo(options)


COMMANDS = [demo]

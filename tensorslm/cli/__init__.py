"""The ``tensorslm`` console script and the demo: a thin click group. Each area's commands live
in their own module and call one library function each; library errors become click errors
here. Uses every room; nothing but ``python -m tensorslm`` imports it."""
from __future__ import annotations

import logging
import os

import click

from tensorslm.cli import demo_commands
from tensorslm.cli import fleet_commands
from tensorslm.cli import policy_commands
from tensorslm.cli import serve_commands
from tensorslm.cli import store_commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="tensorslm")
def cli(verbose: int) -> None:
    """tensorslm: small language models on Raspberry Pis, with energy-aware compressed embeddings."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# Each area module lists its click commands in COMMANDS; importing a module must stay cheap
# (torch, transformers and paho are imported inside the command callbacks).
for module in (store_commands, policy_commands, serve_commands, demo_commands,
               fleet_commands):
    for command in module.COMMANDS:
        cli.add_command(command)


#: OpenMP settings of every ``tensorslm`` process (the systemd unit sets the same), exported
#: before torch is imported: libgomp reads them when torch loads it. A worker spins up to
#: GOMP_SPINCOUNT iterations after each parallel region, then sleeps. libgomp's default
#: (300,000) collapses a 2-thread decode on a CPU that other processes keep busy, and
#: OMP_WAIT_POLICY=PASSIVE (no spin) makes a 2-thread decode slower than one thread; at one
#: thread there is no worker and neither matters (docs/engine.md, Threads).
OPENMP_ENV = {"GOMP_SPINCOUNT": "30000"}


def main() -> None:
    for name, value in OPENMP_ENV.items():   # an owner's own setting wins
        os.environ.setdefault(name, value)
    cli(prog_name="tensorslm")

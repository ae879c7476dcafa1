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
from tensorslm.constants import OPENMP_ENV


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


def main() -> None:
    for name, value in OPENMP_ENV.items():   # an owner's own setting wins
        os.environ.setdefault(name, value)
    cli(prog_name="tensorslm")

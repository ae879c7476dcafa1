"""``tensorslm serve`` (the daemon) and ``tensorslm ask`` (one prompt over MQTT)."""
from __future__ import annotations

import click

from .errors import library_errors


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="agent.yaml (see deploy/agent.example.yaml).")
@library_errors
def serve(config_path: str) -> None:
    """Serve prompts over MQTT until SIGTERM; every query is logged with its energy."""
    from tensorslm.agent.config import load_config
    from tensorslm.agent.daemon import build_agent, run_until_signalled

    run_until_signalled(build_agent(load_config(config_path)))


def _describe(body: dict) -> str:
    energy = body.get("energy") or {}
    if energy.get("joules") is not None:
        spread = (f" ± {energy['uncertainty_j']:.3g}" if energy.get("uncertainty_j") is not None
                  else "")
        joules = f"{energy['joules']:.3g}{spread} J ({energy['method']})"
    else:
        joules = "not metered"
    point = body.get("operating_point") or "-"
    rung = body.get("rung") or "-"
    return (f"energy {joules}, {body.get('output_tokens')} tokens in "
            f"{body.get('latency_s', 0):.2f} s, point {point} (rung {rung}), "
            f"device {body.get('device')}")


@click.command()
@click.argument("prompt")
@click.option("--device", help="Send to this device's request topic.")
@click.option("--fleet", is_flag=True, help="Send to the group's shared topic (any device).")
@click.option("--group", default="default", show_default=True, help="Group for --fleet.")
@click.option("--broker", "broker_url", envvar="TENSORSLM_BROKER", default="mqtt://localhost:1883",
              show_default=True, help="mqtt://host[:port] or mqtts://host[:port].")
@click.option("--protocol", type=click.Choice(["5", "3.1.1"]), default="5", show_default=True)
@click.option("--prefix", default="tensorslm", show_default=True, help="Topic prefix.")
@click.option("--username", envvar="TENSORSLM_USERNAME")
@click.option("--password", envvar="TENSORSLM_PASSWORD", help="Better: $TENSORSLM_PASSWORD.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), help="CA for mqtts://.")
@click.option("--max-new-tokens", type=int)
@click.option("--temperature", type=float, help="Sample at this temperature (default: greedy).")
@click.option("--seed", type=int)
@click.option("--timeout", type=float, default=120, show_default=True, help="Seconds to wait.")
@click.option("--no-stream", is_flag=True, help="Print the answer only when it is complete.")
@library_errors
def ask(prompt: str, device: str | None, fleet: bool, group: str, broker_url: str, protocol: str,
        prefix: str, username: str | None, password: str | None, ca_file: str | None,
        max_new_tokens: int | None, temperature: float | None, seed: int | None,
        timeout: float, no_stream: bool) -> None:
    """Send PROMPT to a device (--device) or a group (--fleet) and print the answer, then its
    energy (with its method) and operating point."""
    from pathlib import Path

    from tensorslm.agent.client import AskClient
    from tensorslm.agent.broker_config import BrokerConfig, MqttProtocol, TlsConfig
    from tensorslm.agent.topics import Topics

    if bool(device) == fleet:
        raise click.UsageError("give exactly one of --device ID or --fleet [--group G]")
    try:
        broker = BrokerConfig.from_url(
            broker_url, protocol=MqttProtocol(protocol), username=username, password=password,
            **({"tls": TlsConfig(ca_file=Path(ca_file))} if ca_file else {}))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    streamed = []

    def on_token(text: str) -> None:
        streamed.append(text)
        click.echo(text, nl=False)

    with AskClient(broker, topics=Topics(prefix), connect_timeout=min(timeout, 10.0)) as client:
        answer = client.ask(prompt, device=device, group=group if fleet else None,
                            timeout=timeout, on_token=None if no_stream else on_token,
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if not answer.ok:
        if streamed:
            click.echo()
        raise click.ClickException(f"{answer.final.type.value} ({answer.body.get('code')}): "
                                   f"{answer.body.get('message')}")
    if not streamed:
        click.echo(answer.text, nl=False)
    click.echo()
    click.echo(_describe(answer.body), err=True)


COMMANDS = [serve, ask]

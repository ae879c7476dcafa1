"""``tensorslm serve`` (the daemon), ``tensorslm ask`` (one prompt over MQTT) and
``tensorslm command`` (override / clear / reload / load-ladder on one device)."""
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
    from tensorslm.agent.daemon import run_until_signalled
    from tensorslm.agent.wiring import build_agent

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


def broker_options(func):
    """The options every command that talks to the fleet's broker takes."""
    for option in reversed([
        click.option("--broker", "broker_url", envvar="TENSORSLM_BROKER",
                     default="mqtt://localhost:1883", show_default=True,
                     help="mqtt://host[:port] or mqtts://host[:port] ($TENSORSLM_BROKER)."),
        click.option("--protocol", type=click.Choice(["5", "3.1.1"]), default="5",
                     show_default=True, help="MQTT version of the broker."),
        click.option("--prefix", default="tensorslm", show_default=True, help="Topic prefix."),
        click.option("--username", envvar="TENSORSLM_USERNAME",
                     help="Broker account ($TENSORSLM_USERNAME)."),
        click.option("--password", envvar="TENSORSLM_PASSWORD",
                     help="Broker password; better: $TENSORSLM_PASSWORD."),
        click.option("--ca-file", type=click.Path(exists=True, dir_okay=False),
                     help="CA certificate for mqtts://."),
    ]):
        func = option(func)
    return func


def _client(broker_url: str, protocol: str, prefix: str, username: str | None,
            password: str | None, ca_file: str | None, timeout: float):
    from pathlib import Path

    from tensorslm.agent.broker_config import BrokerConfig, MqttProtocol, TlsConfig
    from tensorslm.agent.client import AskClient
    from tensorslm.agent.topics import Topics

    try:
        broker = BrokerConfig.from_url(
            broker_url, protocol=MqttProtocol(protocol), username=username, password=password,
            **({"tls": TlsConfig(ca_file=Path(ca_file))} if ca_file else {}))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    return AskClient(broker, topics=Topics(prefix), connect_timeout=min(timeout, 10.0))


def _check_online(client, device: str) -> None:
    """Fail at once when the broker says the device is offline (its retained status)."""
    if client.device_status(device) == "offline":
        raise click.ClickException(
            f"{device} is offline (the broker holds its last status: offline); is "
            f"tensorslm-agent running there? (journalctl -u tensorslm-agent)")


def _refused(answer) -> click.ClickException:
    hint = ""
    if answer.body.get("code") == "not_a_chat_model":
        hint = " (this model only completes text: ask again with --raw)"
    return click.ClickException(f"{answer.final.type.value} ({answer.body.get('code')}): "
                                f"{answer.body.get('message')}{hint}")


@click.command()
@click.argument("prompt")
@click.option("--device", help="Send to this device's request topic.")
@click.option("--fleet", is_flag=True, help="Send to the group's shared topic (any device).")
@click.option("--group", default="default", show_default=True, help="Group for --fleet.")
@click.option("--raw", is_flag=True,
              help="Send PROMPT as a plain completion prompt, no chat template (for base "
                   "models such as gemma3-270m).")
@click.option("--system", "system_prompt", metavar="TEXT",
              help="A system message before PROMPT (chat only).")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096),
              help="At most this many new tokens (the device's operating point may cap it).")
@click.option("--temperature", type=click.FloatRange(0, 10),
              help="Sample at this temperature (default, or 0: greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling: keep the smallest set of tokens with this much "
                   "probability (with --temperature).")
@click.option("--top-k", type=click.IntRange(0), help="Sample among the k likeliest tokens "
                                                      "(with --temperature).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), help="Seed for sampling.")
@broker_options
@click.option("--timeout", type=float, default=120, show_default=True,
              help="Seconds to wait for the answer.")
@click.option("--no-stream", is_flag=True, help="Print the answer only when it is complete.")
@library_errors
def ask(prompt: str, device: str | None, fleet: bool, group: str, raw: bool,
        system_prompt: str | None, max_new_tokens: int | None, temperature: float | None,
        top_p: float | None, top_k: int | None, seed: int | None, broker_url: str,
        protocol: str, prefix: str, username: str | None, password: str | None,
        ca_file: str | None, timeout: float, no_stream: bool) -> None:
    """Send PROMPT to a device (--device) or a group (--fleet) and print the answer, then its
    energy (with its method) and operating point.

    PROMPT goes as a chat message (the model's chat template applies); --raw sends it as a
    plain completion prompt instead. A device serving a base model (no chat template)
    answers a chat message with a not_a_chat_model error.

    \b
      tensorslm ask "What is the capital of France?" --device pi-01
      tensorslm ask "The Eiffel Tower is in" --raw --device pi-02 --max-new-tokens 8
      tensorslm ask "Name three rivers." --fleet --group lab --system "Answer briefly."
    """
    if bool(device) == fleet:
        raise click.UsageError("give exactly one of --device ID or --fleet [--group G]")
    if raw and system_prompt is not None:
        raise click.UsageError("--system needs a chat prompt; drop --raw or --system")
    messages = None
    if not raw:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": prompt})
    streamed = []

    def on_token(text: str) -> None:
        streamed.append(text)
        click.echo(text, nl=False)

    with _client(broker_url, protocol, prefix, username, password, ca_file, timeout) as client:
        if device:
            _check_online(client, device)
        answer = client.ask(prompt if raw else None, messages=messages, device=device,
                            group=group if fleet else None, timeout=timeout,
                            on_token=None if no_stream else on_token,
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, seed=seed)
    if not answer.ok:
        if streamed:
            click.echo()
        raise _refused(answer)
    if not streamed:
        click.echo(answer.text, nl=False)
    click.echo()
    click.echo(_describe(answer.body), err=True)


@click.group()
def command() -> None:
    """Send a command to one device's command topic and print what it did.

    \b
      tensorslm command override pi-01 eco --seconds 600
      tensorslm command clear pi-01
      tensorslm command reload pi-01
      tensorslm command load-ladder pi-01 /var/lib/tensorslm/ladders/current

    The agent answers each command (MQTT 5 response topic, or reply_to with 3.1.1); a
    refused one (unknown point, no policy on the device, a policy file that fails to parse)
    exits 1 with the device's reason. The broker ACL lets only operator accounts write
    commands.
    """


def _send_command(device: str, payload: dict, broker_url: str, protocol: str, prefix: str,
                  username: str | None, password: str | None, ca_file: str | None,
                  timeout: float) -> None:
    from tensorslm.agent.client import NoAnswer

    with _client(broker_url, protocol, prefix, username, password, ca_file, timeout) as client:
        _check_online(client, device)
        try:
            answer = client.command(device, payload, timeout=timeout)
        except NoAnswer:
            raise click.ClickException(
                f"no answer from {device} within {timeout:g} s; is it online (its retained "
                f"{prefix}/devices/{device}/status says so) and serving this prefix?"
            ) from None
    if not answer.ok:
        raise _refused(answer)
    click.echo(f"{device}: {answer.text}")


def _command_options(func):
    func = click.option("--timeout", type=float, default=10, show_default=True,
                        help="Seconds to wait for the device's answer.")(func)
    return broker_options(func)


@command.command("override")
@click.argument("device")
@click.argument("point")
@click.option("--seconds", type=click.FloatRange(0, min_open=True), default=3600,
              show_default=True, help="How long the override lasts (critical battery still "
                                      "wins).")
@_command_options
@library_errors
def command_override(device: str, point: str, seconds: float, **connection) -> None:
    """Serve operating point POINT on DEVICE for --seconds, whatever the policy says."""
    _send_command(device, {"command": "override", "point": point, "seconds": seconds},
                  **connection)


@command.command("clear")
@click.argument("device")
@_command_options
@library_errors
def command_clear(device: str, **connection) -> None:
    """End DEVICE's override: its policy decides again."""
    _send_command(device, {"command": "clear_override"}, **connection)


@command.command("reload")
@click.argument("device")
@_command_options
@library_errors
def command_reload(device: str, **connection) -> None:
    """Re-read DEVICE's policy file; a file that fails to parse keeps the old policy."""
    _send_command(device, {"command": "reload"}, **connection)


@command.command("load-ladder")
@click.argument("device")
@click.argument("path")
@_command_options
@library_errors
def command_load_ladder(device: str, path: str, **connection) -> None:
    """Make DEVICE verify and swap in the ladder at PATH (a directory on the device)."""
    _send_command(device, {"command": "load_ladder", "path": path}, **connection)


COMMANDS = [serve, ask, command]

"""The ``broker:`` section that ``agent.yaml`` and ``collector.yaml`` share, read by one parser.

Both files describe their MQTT connection with the same keys::

    broker:
      url: mqtts://broker.fleet.lan:8883
      username: pi-01
      password_file: /etc/tensorslm/agent.password   # or password: inline
      tls: {ca_file: ca.crt, cert_file: pi-01.crt, key_file: pi-01.key}
      client_id: tensorslm-agent-pi-01
      keepalive_s: 30
      reconnect_min_s: 1
      reconnect_max_s: 30

:func:`read_broker` reads them. The caller then reads the keys only its file has (the agent's
``protocol``, the collector's ``session_expiry_s``), checks the URL in its own terms, builds its
own ``BrokerConfig`` and calls ``section.reject_unknown()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tensorslm.config_file import Section


@dataclass(frozen=True)
class TlsConfig:
    ca_file: Path | None = None       # None: the system's trusted CAs
    cert_file: Path | None = None     # client certificate, when the broker asks for one
    key_file: Path | None = None
    insecure: bool = False            # skip host name checking (test brokers only)


@dataclass(frozen=True)
class BrokerSettings:
    """What a ``broker:`` mapping says, before the agent or the collector interprets its URL."""

    url: str
    tls: TlsConfig | None             # the tls: mapping; None when there is none
    username: str | None
    password: str | None = field(repr=False)
    client_id: str
    keepalive_s: int
    reconnect_min_s: float            # reconnect backoff doubles from min to max
    reconnect_max_s: float


def read_broker(section: Section, resolve: Callable[[str], Path], *, client_id: str,
                reconnect_max_s: float, reconnect_limits_s: tuple[float, float] | None = None,
                tls_insecure: bool = False, tls_files_must_exist: bool = False
                ) -> BrokerSettings:
    """Read the keys of ``broker:`` that both files have; errors name file, line and field.

    ``resolve`` turns a path of the file into a Path (relative to the file's folder);
    ``client_id`` and ``reconnect_max_s`` are the defaults; ``reconnect_limits_s`` caps
    reconnect_min_s and reconnect_max_s; ``tls_insecure`` accepts ``tls.insecure``;
    ``tls_files_must_exist`` checks now that the TLS files are there.
    """
    def path(sec: Section, key: str) -> Path | None:
        value = sec.str(key, None)
        return None if value is None else resolve(value)

    url = section.str("url")
    tls = None
    tls_section = section.section("tls", None)
    if tls_section is not None:
        tls = TlsConfig(ca_file=path(tls_section, "ca_file"),
                        cert_file=path(tls_section, "cert_file"),
                        key_file=path(tls_section, "key_file"),
                        insecure=tls_section.bool("insecure", False) if tls_insecure else False)
        if tls_files_must_exist:
            for key in ("ca_file", "cert_file", "key_file"):
                file = getattr(tls, key)
                if file is not None and not file.is_file():
                    raise tls_section.field_error(key, f"file not found: {file}")
        if (tls.cert_file is None) != (tls.key_file is None):
            raise tls_section.field_error("cert_file" if tls.cert_file is None else "key_file",
                                          "expected cert_file and key_file together (client "
                                          "certificate), got only one")
        tls_section.reject_unknown()

    username = section.str("username", None)
    password = section.str("password", None)
    password_file = path(section, "password_file")
    if password is not None and password_file is not None:
        raise section.field_error("password_file", "expected password or password_file, got both")
    if password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise section.field_error("password_file", f"cannot read {password_file}: "
                                                       f"{exc.strerror}") from None

    longest_min, longest_max = reconnect_limits_s or (None, None)
    reconnect_min = section.float("reconnect_min_s", 1.0, minimum=0.1, maximum=longest_min)
    return BrokerSettings(
        url=url, tls=tls, username=username, password=password,
        client_id=section.str("client_id", client_id),
        keepalive_s=section.int("keepalive_s", 30, minimum=5, maximum=3600),
        reconnect_min_s=reconnect_min,
        reconnect_max_s=section.float("reconnect_max_s", reconnect_max_s, minimum=reconnect_min,
                                      maximum=longest_max))

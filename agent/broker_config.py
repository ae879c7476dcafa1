"""The MQTT broker connection: one :class:`BrokerConfig` for the agent, the collector and the
command line, and the one parser of the ``broker:`` section that ``agent.yaml`` and
``collector.yaml`` share::

    broker:
      url: mqtts://broker.fleet.lan:8883
      username: pi-01
      password_file: /etc/tensorslm/agent.password   # or password: inline
      tls: {ca_file: ca.crt, cert_file: pi-01.crt, key_file: pi-01.key}
      client_id: tensorslm-agent-pi-01
      keepalive_s: 30
      reconnect_min_s: 1
      reconnect_max_s: 30
      protocol: "5"              # agent.yaml only: 5 | 3.1.1
      session_expiry_s: 604800   # collector.yaml only: a persistent MQTT 5 session

:func:`read_broker` reads the section (each file says which of its own keys it accepts) and
returns a :class:`BrokerConfig`; :func:`tensorslm.agent.client.mqtt_client` turns one into a
paho client. Imports no paho.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

from tensorslm.config_file import Section

from .errors import AgentError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class BadBrokerUrl(AgentError, ValueError):
    """A broker URL that is not ``mqtt[s]://[user[:password]@]host[:port]``."""


class MqttProtocol(str, enum.Enum):
    V5 = "5"
    V311 = "3.1.1"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TlsConfig:
    ca_file: Path | None = None       # None: the system's trusted CAs
    cert_file: Path | None = None     # client certificate, when the broker asks for one
    key_file: Path | None = None
    insecure: bool = False            # skip host name checking (test brokers only)


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int = 1883
    tls: TlsConfig | None = None      # set for mqtts:// URLs
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: MqttProtocol = MqttProtocol.V5
    keepalive_s: int = 30
    client_id: str | None = None      # None: the caller's default
    reconnect_min_s: float = 1.0      # reconnect backoff doubles from min to max
    reconnect_max_s: float = 30.0
    session_expiry_s: int | None = None   # MQTT 5 session kept this long; None: clean session

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @classmethod
    def from_url(cls, url: str, **kwargs) -> "BrokerConfig":
        """``mqtt://host[:port]`` or ``mqtts://host[:port]`` (user:password@ allowed); the other
        fields as keywords. Raises :class:`BadBrokerUrl`."""
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise BadBrokerUrl(f"expected a broker URL mqtt://host[:port] or "
                               f"mqtts://host[:port], got {url!r}")
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise BadBrokerUrl(f"expected a port number 1-65535 in {url!r}") from None
        if parts.path not in ("", "/") or parts.query:
            raise BadBrokerUrl(f"expected no path or query in the broker URL, got {url!r}")
        tls = kwargs.pop("tls", None)
        if parts.scheme == "mqtts" and tls is None:
            tls = TlsConfig()
        if parts.scheme == "mqtt" and tls is not None:
            raise BadBrokerUrl(f"a tls section needs an mqtts:// url, got the plain {url!r}; "
                               f"use mqtts://")
        if parts.username is not None and "username" not in kwargs:
            kwargs["username"] = unquote(parts.username)
        if parts.password is not None and "password" not in kwargs:
            kwargs["password"] = unquote(parts.password)
        return cls(host=parts.hostname, port=port, tls=tls, **kwargs)


def read_broker(section: Section, resolve: Callable[[str], Path], *, client_id: str,
                reconnect_max_s: float, reconnect_limits_s: tuple[float, float] | None = None,
                protocol_key: bool = False, session_expiry_s: int | None = None,
                tls_insecure: bool = False, tls_files_must_exist: bool = False) -> BrokerConfig:
    """Read ``broker:`` into a :class:`BrokerConfig`; errors name file, line and field.

    ``resolve`` turns a path of the file into a Path (relative to the file's folder);
    ``client_id`` and ``reconnect_max_s`` are the file's defaults; ``reconnect_limits_s`` caps
    reconnect_min_s and reconnect_max_s. The keys one file has and the other has not:
    ``protocol_key`` accepts ``protocol`` (else MQTT 5); ``session_expiry_s``, when given,
    accepts ``session_expiry_s`` with that default; ``tls_insecure`` accepts ``tls.insecure``.
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
    if password is not None and username is None:
        raise section.field_error("username", "a password needs a username")

    protocol = MqttProtocol.V5
    if protocol_key:
        if "protocol" in section and section.plain.get("protocol") == 5:   # unquoted 5: a number
            section.int("protocol")
        else:
            protocol = MqttProtocol(section.choice("protocol", [p.value for p in MqttProtocol],
                                                   MqttProtocol.V5.value))
    expiry = None
    if session_expiry_s is not None:
        expiry = section.int("session_expiry_s", session_expiry_s, minimum=60,
                             maximum=2**32 - 1)

    longest_min, longest_max = reconnect_limits_s or (None, None)
    reconnect_min = section.float("reconnect_min_s", 1.0, minimum=0.1, maximum=longest_min)
    try:
        broker = BrokerConfig.from_url(
            url, tls=tls, username=username, password=password, protocol=protocol,
            client_id=section.str("client_id", client_id),
            keepalive_s=section.int("keepalive_s", 30, minimum=5, maximum=3600),
            reconnect_min_s=reconnect_min,
            reconnect_max_s=section.float("reconnect_max_s", reconnect_max_s,
                                          minimum=reconnect_min, maximum=longest_max),
            session_expiry_s=expiry)
    except BadBrokerUrl as exc:
        raise section.field_error("tls" if "tls section" in str(exc) else "url",
                                  str(exc)) from None
    if tls_files_must_exist and tls is not None:
        for key in ("ca_file", "cert_file", "key_file"):
            file = getattr(tls, key)
            if file is not None and not file.is_file():
                raise tls_section.field_error(key, f"file not found: {file}")
    section.reject_unknown()
    return broker

"""The agent daemon: serves prompts over MQTT, one at a time, and logs every query.

Threads: paho's network thread validates and queues requests (committing each accepted one
to the query log before the broker gets its PUBACK); one worker thread runs the queue; the
thread that calls :meth:`Agent.run` keeps house (telemetry, outbox, switches, watchdog).

From Python (the demo, tests)::

    agent = Agent(device="pi-01", broker=BrokerConfig.from_url(url), generator=HFGenerator(m, t),
                  query_log=QueryLog("queries.db", "pi-01"), meter=meter, controller=controller,
                  actuator=actuator)
    agent.start()            # run() in a background thread; agent.ready.wait() until serving
    ...
    agent.stop(); agent.join()

:func:`tensorslm.agent.wiring.build_agent` builds one from ``agent.yaml``;
:func:`run_until_signalled` runs it until SIGTERM/SIGINT.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from tensorslm.controller.decision.control_loop import Switch
from tensorslm.controller.decision.operating_point import OperatingPoint
from tensorslm.controller.decision.policy import Policy
from tensorslm.controller.errors import ControllerError
from tensorslm.errors import ConfigError
from tensorslm.controller.power.readings import EnergyReport, PowerReading
from tensorslm.rank_store.errors import RankStoreError

from .actuator import AgentActuator
from .client import connect_async, disable_nagle, mqtt_client
from .config import ServingConfig
from .broker_config import BrokerConfig, MqttProtocol
from .errors import AgentError
from .generation import GenerationResult, Generator
from .ladder_update import LadderEvent, prepare_ladder
from .outbox import Outbox
from .prompting import PromptError
from .protocol import (BadRequest, ErrorCode, Outcome, ReplyAddress, Request,
                       command_reply_message, error_message, new_request_id,
                       request_id_from_correlation,
                       parse_request, reply_message, requester_of, token_message)
from .query_log import QueryLog, QueryLogError
from .systemd_notify import Notifier, stop_on_signals
from .topics import Topics

log = logging.getLogger(__name__)

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
STOP_JOIN_S = 10.0   # after drain_timeout_s: how long a stopped generation may take to return


class Meter(Protocol):
    """What the agent needs of tensorslm.controller.power.energy_meter.EnergyMeter."""

    def begin(self) -> Any: ...

    def end(self, window: Any) -> EnergyReport: ...


class Controller(Protocol):
    """What the agent uses of :class:`tensorslm.controller.decision.control_loop.Controller`:
    its state for records and telemetry, the command topic's commands, and its thread (started
    and stopped by :func:`run_until_signalled`)."""

    switches: Sequence[Switch]         # applied switches, oldest first (a bounded history)

    @property
    def policy(self) -> Policy: ...

    @property
    def current_point(self) -> OperatingPoint | None: ...

    @property
    def latest_reading(self) -> PowerReading | None: ...

    def set_override(self, point: str, seconds: float) -> None: ...

    def clear_override(self) -> None: ...

    def reload_policy(self) -> ConfigError | None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class CommandError(AgentError, ValueError):
    """A message on the command topic that cannot be carried out."""


@dataclass
class _Job:
    request: Request
    stream: bool
    key: str            # the query log's key (QueryLog.key_for)


class Agent:
    """One device's daemon. Meter, controller and actuator are optional (:class:`Meter`,
    :class:`Controller`, :class:`~tensorslm.agent.actuator.AgentActuator`); each new switch of
    the controller is logged. The agent does not start or stop the controller
    (:func:`run_until_signalled` does)."""

    def __init__(self, *, device: str, broker: BrokerConfig, generator: Generator,
                 query_log: QueryLog, group: str = "default", topics: Topics | None = None,
                 meter: Meter | None = None, controller: Controller | None = None,
                 actuator: AgentActuator | None = None, serving: ServingConfig = ServingConfig(),
                 notifier: Notifier | None = None, model_info: dict | None = None,
                 reconnect_delay: tuple[float, float] | None = None, tick_s: float = 0.5
                 ) -> None:
        self.device = device
        self.group = group
        self.broker = broker
        self.topics = topics or Topics()
        self.generator = generator
        self.log = query_log
        self.meter = meter
        self.controller = controller
        self.actuator = actuator or AgentActuator(generator)
        self.serving = serving
        self.notifier = notifier or Notifier()
        self.model_info = model_info or {"model": generator.model_ref}
        self.tick_s = tick_s
        # requests are acknowledged (PUBACK) only once committed to the log or answered
        self.client = mqtt_client(broker, broker.client_id or f"tensorslm-agent-{device}",
                                  reconnect_delay=reconnect_delay, manual_ack=True)
        self.client.will_set(self.topics.status(device), STATUS_OFFLINE, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self._subscribe_mid: int | None = None
        self.outbox = Outbox(query_log, self.client, self.topics.records(device))

        self.ready = threading.Event()       # subscribed and serving
        self.stopped = threading.Event()     # run() has returned
        self._stop = threading.Event()
        self._wake = threading.Event()       # housekeeping now: a query ended, connected, stop
        self._accepting = True
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._connected = threading.Event()
        self._interrupted: list = []
        self._unconfirmed: list[tuple[str, Any]] = []   # interrupted replies awaiting PUBACK
        self._halt = threading.Event()       # stop the running generation (drain timed out)
        self._last_switch: Switch | None = None
        self._thread: threading.Thread | None = None
        self.served = 0
        self._pending_ladder: tuple[str, Any] | None = None
        self.ladder_event: LadderEvent | None = None

    @property
    def v5(self) -> bool:
        return self.broker.protocol is MqttProtocol.V5

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue) + (1 if self._busy else 0)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Agent":
        """Run in a background thread (for the demo and tests)."""
        self._thread = threading.Thread(target=self.run, name=f"agent-{self.device}", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        """Stop taking work; queued queries are finished (within the drain timeout)."""
        self._stop.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()

    def run(self) -> None:
        """Serve until :meth:`stop`. Blocks; call from the main thread or via :meth:`start`."""
        self._interrupted = self.log.recover(time.time())
        connect_async(self.client, self.broker)
        self.client.loop_start()
        worker = threading.Thread(target=self._work, name=f"agent-{self.device}-worker",
                                  daemon=True)
        worker.start()
        next_telemetry = 0.0
        wait = self.tick_s
        if self.notifier.watchdog_interval is not None:   # never let a ping come late
            wait = min(wait, self.notifier.watchdog_interval / 2)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                try:
                    self._poll_switch()   # a switch not logged now is logged at the next tick
                except (sqlite3.Error, QueryLogError) as exc:
                    log.warning("cannot log an operating-point switch yet: %s", exc)
                with self._cond:
                    if not self._busy:
                        self._swap_ladder_locked()
                if self._connected.is_set():
                    self.outbox.drain()
                    self._confirm_interrupted()
                    if now >= next_telemetry:
                        self._publish_telemetry()
                        next_telemetry = now + self.serving.telemetry_interval_s
                self.notifier.watchdog_due()
                self._wake.wait(wait)
                self._wake.clear()
        finally:
            self._shutdown(worker)

    def _shutdown(self, worker: threading.Thread) -> None:
        self.notifier.stopping("finishing queued queries")
        with self._cond:
            self._accepting = False
        if self._connected.is_set():
            self.client.unsubscribe(self._request_topics())
        worker.join(self.serving.drain_timeout_s)
        if worker.is_alive():
            # never exit with a generation running on another thread (torch aborts the
            # process): the generator checks the flag before each token
            log.warning("a query is still running after %.0f s (drain_timeout_s); stopping it",
                        self.serving.drain_timeout_s)
            self._halt.set()
            with self._cond:
                self._cond.notify_all()
            worker.join(STOP_JOIN_S)
            if worker.is_alive():
                log.error("the running query did not stop within %.0f s; it stays 'accepted' "
                          "and is marked interrupted at the next start", STOP_JOIN_S)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        for job in left:
            self._fail(job, Outcome.FAILED, ErrorCode.SHUTTING_DOWN,
                       "the agent is shutting down; send the request again")
        self._poll_switch()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and self._connected.is_set():
            self.outbox.drain()
            self._confirm_interrupted()
            if self.outbox.in_flight == 0 and self.log.unsent_count() == 0:
                break
            time.sleep(0.05)
        info = self.client.publish(self.topics.status(self.device), STATUS_OFFLINE, qos=1,
                                   retain=True)
        if self._connected.is_set():
            try:
                info.wait_for_publish(2.0)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()
        if not worker.is_alive():
            self.log.close()
        self.stopped.set()
        log.info("agent %s stopped after %d queries", self.device, self.served)

    # -- MQTT callbacks (paho's network thread) --------------------------------------------------
    def _request_topics(self) -> list[str]:
        return [self.topics.request(self.device), self.topics.fleet_subscription(self.group)]

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker %s refused the connection: %s", self.broker.url, reason_code)
            return
        log.info("connected to %s as %s", self.broker.url, self.device)
        disable_nagle(client)
        topics = [self.topics.command(self.device)]
        if self._accepting:
            topics += self._request_topics()
        _, self._subscribe_mid = client.subscribe([(topic, 1) for topic in topics])
        interrupted, self._interrupted = self._interrupted, []
        for item in interrupted:
            if item.reply is not None:
                info = self._send(item.reply, error_message(
                    item.reply_id, ErrorCode.INTERRUPTED, "the agent stopped while serving "
                    "this request; send it again", device=self.device))
                self._unconfirmed.append((item.request_id, info))

    def _confirm_interrupted(self) -> None:
        """Forget the reply address of each interrupted reply the broker acknowledged."""
        for key, info in list(self._unconfirmed):
            if info.is_published():
                try:
                    self.log.forget_reply(key)
                except (sqlite3.Error, QueryLogError) as exc:   # kept: answered again at restart
                    log.warning("cannot forget the reply address of %s: %s", key, exc)
                self._unconfirmed.remove((key, info))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            log.error("the broker refused subscriptions of %s: %s (check its ACL)", self.device,
                      refused)
        # online only once the broker has our subscriptions: no request is dropped before
        client.publish(self.topics.status(self.device), STATUS_ONLINE, qos=1, retain=True)
        self._connected.set()
        self._wake.set()
        self._publish_telemetry()
        if not self.ready.is_set():
            self.ready.set()
            self.notifier.ready(f"serving {self.device} via {self.broker.url}")
        else:
            self.notifier.status(f"reconnected to {self.broker.url}")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("lost the broker %s (%s); reconnecting", self.broker.url, reason_code)
            self.notifier.status(f"broker {self.broker.url} unreachable; reconnecting")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.outbox.on_publish(mid)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            if msg.topic == self.topics.command(self.device):
                props = getattr(msg, "properties", None)
                reply = None
                if self.v5 and props is not None and getattr(props, "ResponseTopic", None):
                    reply = ReplyAddress(props.ResponseTopic,
                                         getattr(props, "CorrelationData", None))
                self._on_command(msg.payload, reply)
            else:
                self._on_request(msg)
        except Exception:   # a callback that raises would stop paho's loop: log, keep serving
            log.exception("unexpected error handling a message on %s; not acknowledged",
                          msg.topic)
            return
        if msg.qos > 0:   # committed to the log, or answered: the broker may forget it
            client.ack(msg.mid, msg.qos)

    def _on_request(self, msg: Any) -> None:
        received_at = time.time()
        reply = None
        props = getattr(msg, "properties", None)
        if self.v5 and props is not None and getattr(props, "ResponseTopic", None):
            reply = ReplyAddress(props.ResponseTopic, getattr(props, "CorrelationData", None))
        try:
            request = parse_request(msg.payload, received_at=received_at, reply=reply,
                                    max_prompt_chars=self.serving.max_prompt_chars,
                                    topics=self.topics)
        except BadRequest as exc:
            try:
                self.log.refuse(exc.request_id, received_at, Outcome.ERROR, exc.code,
                                requester_of(exc.reply))
            except (sqlite3.Error, QueryLogError) as log_error:
                log.error("cannot log refused request %s: %s", exc.request_id, log_error)
            self._answer(exc.reply, exc.request_id, exc.code, exc.message)
            return
        expiry = getattr(props, "MessageExpiryInterval", None) if self.v5 and props else None
        if request.deadline is None and expiry is not None:
            # MQTT 5 message expiry (what is left of it on arrival) is a deadline too
            request = dataclasses.replace(request, deadline=received_at + expiry)
        if request.expired(received_at):
            self._refuse(request, Outcome.EXPIRED, ErrorCode.EXPIRED,
                         f"the deadline {request.deadline} had passed on arrival "
                         f"({received_at - request.deadline:.3f} s late)")
            return
        empty = self._battery_empty()
        if empty is not None:
            self._refuse(request, Outcome.ERROR, ErrorCode.BATTERY_EMPTY, empty)
            return
        stream = self.serving.stream if request.stream is None else request.stream
        key = None
        with self._cond:   # the accepting flag and the queue change together
            accepting = self._accepting
            full = accepting and len(self._queue) >= self.serving.queue_size
            if accepting and not full:
                try:
                    key = self.log.accept(request.request_id, received_at, request.reply,
                                          request.requester)
                except (sqlite3.Error, QueryLogError) as exc:
                    log.error("cannot log request %s, not accepted: %s", request.request_id, exc)
                    self._answer(request.reply, request.request_id, ErrorCode.LOG_UNAVAILABLE,
                                 f"the device cannot record this request ({exc}); send it "
                                 "again later or to another device")
                    return
                if key is not None:
                    self._queue.append(_Job(request, stream, key))
                    self._cond.notify()
        if accepting and not full and key is None:
            self._answer_duplicate(request)
        if not accepting:
            self._refuse(request, Outcome.ERROR, ErrorCode.SHUTTING_DOWN,
                         "the agent is shutting down; send the request to another device")
        elif full:
            self._refuse(request, Outcome.BUSY, ErrorCode.BUSY,
                         f"the queue is full ({self.serving.queue_size} waiting); try "
                         "another device or later")

    def _refuse(self, request: Request, outcome: Outcome, code: ErrorCode, message: str) -> None:
        """Log a request answered without work, and answer it (a redelivered one again)."""
        try:
            self.log.refuse(request.request_id, request.received_at, outcome, code,
                            request.requester)
        except (sqlite3.Error, QueryLogError) as exc:
            log.error("cannot log refused request %s: %s", request.request_id, exc)
        self._answer(request.reply, request.request_id, code, message)

    def _answer_duplicate(self, request: Request) -> None:
        """This requester already sent this id: in flight, its own reply will come; answered,
        say so (the result is in the log, not kept to send twice)."""
        row = self.log.query(self.log.key_for(request.request_id, request.requester))
        if row is None or row["outcome"] == Outcome.ACCEPTED.value:
            log.info("request %s is in flight; a repeat is not served twice", request.request_id)
            return
        self._answer(request.reply, request.request_id, ErrorCode.DUPLICATE,
                     f"request id {request.request_id!r} was received before and answered "
                     f"({row['outcome']}{', ' + row['error_code'] if row['error_code'] else ''}); "
                     "send a new id to ask again")

    def _battery_empty(self) -> str | None:
        """Why no work can be taken when the latest reading says the battery is empty and
        there is no external power, else None."""
        reading = self._reading()
        if reading is None or reading.battery_percent is None or reading.battery_percent > 0 \
                or reading.on_external_power:
            return None
        return (f"the battery is empty ({reading.battery_percent:g} %, {reading.method}); this "
                "device takes no work until it is charged")

    def _answer(self, reply: ReplyAddress | None, request_id: str, code: ErrorCode,
                message: str) -> None:
        if reply is None:
            log.warning("request %s refused (%s: %s) and has no reply address", request_id,
                        code.value, message)
            return
        self._send(reply, error_message(request_id, code, message, device=self.device))

    def _send(self, reply: ReplyAddress, payload: bytes, qos: int = 1) -> Any:
        properties = None
        if self.v5 and reply.correlation_data is not None:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = reply.correlation_data
        return self.client.publish(reply.topic, payload, qos=qos, properties=properties)

    def _on_command(self, payload: bytes, reply: ReplyAddress | None = None) -> None:
        """``{"command": "override", "point": NAME, "seconds": S}``, ``{"command":
        "clear_override"}``, ``{"command": "reload"}`` or ``{"command": "load_ladder",
        "path": STORE_DIR}`` (see :mod:`tensorslm.agent.ladder_update`). With a reply address
        (MQTT 5 Response Topic, or ``reply_to`` and ``id`` in the payload) the outcome is
        answered: a ``reply`` whose ``text`` says what was done, or a ``bad_command`` error."""
        command_id = request_id_from_correlation(reply.correlation_data if reply else None)
        try:
            data = json.loads(payload.decode("utf-8"))
            if not isinstance(data, dict):
                raise CommandError(f"expected a JSON object, got {payload[:80]!r}")
            if isinstance(data.get("id"), str):
                command_id = data["id"]
            if reply is None and isinstance(data.get("reply_to"), str):
                reply = ReplyAddress(data["reply_to"], None)
            done = self._carry_out(data)
            log.info("command %s", done)
        except (UnicodeDecodeError, json.JSONDecodeError, CommandError, ValueError,
                ControllerError) as exc:
            log.warning("refused a command: %s", exc)
            if reply is not None:
                self._send(reply, error_message(command_id or new_request_id(),
                                                ErrorCode.BAD_COMMAND, str(exc),
                                                device=self.device))
            return
        if reply is not None:
            self._send(reply, command_reply_message(command_id or new_request_id(), done,
                                                    device=self.device))

    def _carry_out(self, data: dict) -> str:
        """Carry out one command; returns what was done, raises CommandError."""
        command = data.get("command")
        if command == "load_ladder":
            path = data.get("path")
            if not isinstance(path, str) or not path:
                raise CommandError("expected {'command': 'load_ladder', 'path': STORE_DIR}, "
                                   f"got {data!r}")
            self._start_ladder_update(path)
            return f"load_ladder {path}: verifying (telemetry's ladder_update says the outcome)"
        if command not in ("override", "clear_override", "reload"):
            raise CommandError(f"expected command override, clear_override, reload or "
                               f"load_ladder, got {command!r}")
        if self.controller is None:
            raise CommandError(f"command {command!r} needs a controller; this agent runs "
                               "without an energy policy (agent.yaml has no policy or no "
                               "power section)")
        if command == "override":
            point, seconds = data.get("point"), data.get("seconds", 3600)
            if not isinstance(point, str) or not isinstance(seconds, (int, float)) \
                    or isinstance(seconds, bool) or seconds <= 0:
                raise CommandError("expected {'command': 'override', 'point': NAME, "
                                   f"'seconds': >0}}, got {data!r}")
            self.controller.set_override(point, float(seconds))
            return f"override: point {point} for {float(seconds):g} s"
        if command == "clear_override":
            self.controller.clear_override()
            return "clear_override: the policy decides again"
        error = self.controller.reload_policy()
        if error is not None:
            raise CommandError(f"policy reload failed, old policy kept: {error}")
        return "reload: policy reloaded"

    # -- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(0.5)
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._swap_ladder_locked()
                self._busy = True
            try:
                self._serve(job)
            except Exception:   # never let one query kill the worker
                log.exception("query %s failed unexpectedly", job.request.request_id)
                try:
                    self._fail(job, Outcome.ERROR, ErrorCode.GENERATION_FAILED,
                               "the agent failed on this request")
                except (sqlite3.Error, QueryLogError):
                    log.exception("query %s stays 'accepted' (marked interrupted at the next "
                                  "start)", job.request.request_id)
                    self._answer(job.request.reply, job.request.request_id,
                                 ErrorCode.LOG_UNAVAILABLE, "the device could not record this "
                                 "query's result; send it again later or to another device")
            finally:
                with self._cond:
                    self._busy = False
                self._wake.set()   # publish the finished row at once

    def _fail(self, job: _Job, outcome: Outcome, code: ErrorCode, message: str) -> None:
        self.log.finish(job.key, outcome, error_code=code.value, finished_at=time.time())
        self._answer(job.request.reply, job.request.request_id, code, message)

    def _reading(self) -> PowerReading | None:
        return self.controller.latest_reading if self.controller is not None else None

    def _serve(self, job: _Job) -> None:
        request = job.request
        now = time.time()
        if request.expired(now):
            self._fail(job, Outcome.EXPIRED, ErrorCode.EXPIRED,
                       f"the deadline passed while queued ({now - request.deadline:.3f} s ago)")
            return
        empty = self._battery_empty()
        if empty is not None:
            self._fail(job, Outcome.ERROR, ErrorCode.BATTERY_EMPTY, empty)
            return
        point = self.actuator.take()
        max_new = self.actuator.cap(request.max_new_tokens, self.serving.max_new_tokens)
        # the device's hard limit, whatever the request, the policy and the default say
        clipped_from = max_new if max_new > self.serving.max_new_tokens_limit else None
        max_new = min(max_new, self.serving.max_new_tokens_limit)
        start_reading = self._reading()
        on_token = None
        if job.stream and request.reply is not None:
            index = 0

            def on_token(text: str) -> None:
                nonlocal index
                self._send(request.reply, token_message(request.request_id, index, text), qos=0)
                index += 1

        rung = self.generator.rung or (point.rung if point else None)
        precision = self.generator.precision
        window = self.meter.begin() if self.meter is not None else None
        started_at = time.time()
        try:
            result: GenerationResult = self.generator.generate(request, max_new_tokens=max_new,
                                                               on_token=on_token,
                                                               stop=self._halt)
        except PromptError as exc:   # a request this model cannot take: the client's to fix
            log.info("request %s refused: %s", request.request_id, exc)
            self._fail(job, Outcome.ERROR, exc.code, str(exc))
            return
        except Exception as exc:   # any model failure is this query's error, not the daemon's
            log.exception("generation failed for %s", request.request_id)
            self._fail(job, Outcome.ERROR, ErrorCode.GENERATION_FAILED,
                       f"generation failed: {exc}")
            return
        report = None
        if self.meter is not None:
            try:
                report = self.meter.end(window)
            except ControllerError as exc:   # a sensor fault: no figure, never a made-up one
                log.warning("no energy figure for %s: %s", request.request_id, exc)
        if self._halt.is_set():   # stopped at shutdown after a partial answer
            self._fail(job, Outcome.FAILED, ErrorCode.INTERRUPTED,
                       "the agent stopped while serving this request; send it again")
            return
        finished_at = time.time()
        end_reading = self._reading()
        if report is not None and self._battery_empty() is not None:
            # the battery ran out during the query: its counter stopped, the figure is short
            log.warning("the battery ran empty during %s; its energy is not recorded",
                        request.request_id)
            report = None
        fields = dict(
            started_at=started_at, finished_at=finished_at,
            prompt_tokens=result.prompt_tokens, output_tokens=result.output_tokens,
            latency_s=finished_at - request.received_at,
            ttft_s=None if result.ttft_s is None else started_at - request.received_at
            + result.ttft_s,
            energy_j=report.joules if report else None,
            energy_method=str(report.method) if report else None,
            energy_uncertainty_j=report.uncertainty_joules if report else None,
            mean_watts=report.mean_watts if report else None,
            operating_point=point.name if point else None, rung=rung, precision=precision,
            battery_start=start_reading.battery_percent if start_reading else None,
            battery_end=end_reading.battery_percent if end_reading else None)
        self.log.finish(job.key, Outcome.OK, **fields)   # committed before the reply
        self.served += 1
        if request.reply is not None:
            self._send(request.reply, reply_message(
                request.request_id, text=result.text, prompt_tokens=result.prompt_tokens,
                output_tokens=result.output_tokens, latency_s=fields["latency_s"],
                ttft_s=fields["ttft_s"], energy_j=fields["energy_j"],
                energy_method=fields["energy_method"],
                energy_uncertainty_j=fields["energy_uncertainty_j"],
                mean_watts=fields["mean_watts"], operating_point=fields["operating_point"],
                rung=rung, device=self.device, max_new_tokens=max_new,
                clipped_from=clipped_from, precision=precision))
        else:
            log.info("query %s done (%d tokens) with no reply address", request.request_id,
                     result.output_tokens)

    # -- housekeeping -------------------------------------------------------------------------
    def _poll_switch(self) -> None:
        """Log the controller's switches that are not logged yet."""
        if self.controller is None:
            return
        items = list(self.controller.switches)
        new = items
        if self._last_switch is not None:
            for i, item in enumerate(items):
                if item is self._last_switch:
                    new = items[i + 1:]
                    break
        for item in new:
            reading = item.reading
            wall = item.wall_time.timestamp() if item.wall_time is not None else time.time()
            self.log.record_switch(time=wall, from_point=item.from_point,
                                   to_point=item.to_point, reason=f"{item.rule}: {item.reason}",
                                   battery_percent=reading.battery_percent if reading else None,
                                   watts=reading.watts if reading else None)
        if items:
            self._last_switch = items[-1]

    # -- ladder updates (tensorslm.agent.ladder_update) ----------------------------------------------------
    def _start_ladder_update(self, path: str) -> None:
        self.ladder_event = LadderEvent(path, "verifying")
        threading.Thread(target=self._prepare_ladder, args=(path,), name="ladder-verify",
                         daemon=True).start()

    def _prepare_ladder(self, path: str) -> None:
        needed = ([point.rung for point in self.controller.policy.points]
                  if self.controller is not None else [])
        try:
            new = prepare_ladder(path, self.generator.embedding, needed)
        except (RankStoreError, AgentError) as exc:
            log.error("new ladder refused, the current one keeps serving: %s", exc)
            self.ladder_event = LadderEvent(path, "refused", str(exc))
            return
        with self._cond:
            self._pending_ladder = (path, new)
            self.ladder_event = LadderEvent(path, "pending")
        self._wake.set()

    def _swap_ladder_locked(self) -> None:
        """Adopt a verified ladder; the caller holds ``_cond`` and no query is running."""
        if self._pending_ladder is None:
            return
        (path, new), self._pending_ladder = self._pending_ladder, None
        try:
            self.generator.embedding.adopt(new)
        except RankStoreError as exc:
            log.error("new ladder refused, the current one keeps serving: %s", exc)
            self.ladder_event = LadderEvent(path, "refused", str(exc))
            return
        self.model_info["store"] = path
        self.ladder_event = LadderEvent(path, "active")
        log.info("now serving the ladder at %s", path)

    def telemetry(self) -> dict:
        reading = self._reading()
        point = self.actuator.active or self.actuator.pending
        embedding = self.generator.embedding
        return {
            "device": self.device, "time": time.time(),
            "battery_percent": reading.battery_percent if reading else None,
            "watts": reading.watts if reading else None,
            "power_method": str(reading.method) if reading is not None else None,
            "operating_point": point.name if point else None,
            "rung": self.generator.rung or (point.rung if point else None),
            "precision": self.generator.precision,
            "queue_depth": self.queue_depth, "queue_size": self.serving.queue_size,
            "ladder": list(embedding.rung_names) if embedding is not None else None,
            "served": self.served, **self.model_info,
            "ladder_update": self.ladder_event.to_dict() if self.ladder_event else None,
        }

    def _publish_telemetry(self) -> None:
        self.client.publish(self.topics.telemetry(self.device),
                            json.dumps(self.telemetry(), default=str).encode(), qos=0,
                            retain=True)


def run_until_signalled(agent: Agent) -> None:
    """Run ``agent`` in this (main) thread; SIGTERM or SIGINT stops it cleanly."""
    controller = agent.controller
    with stop_on_signals(agent.stop):
        try:
            if controller is not None:
                controller.start()
            agent.run()
        finally:
            if controller is not None:
                controller.stop()

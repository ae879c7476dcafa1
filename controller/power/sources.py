"""Build a PowerSource, and an EnergyMeter for it, from the ``power:`` config section.

::

    power:
      kind: ups                  # ina219 | ups | fuel_gauge | sysfs | rapl | gpio | simulated | estimated
      board: waveshare-ups-hat   # ups: the board profile (tensorslm.controller.power.ups_boards.BOARDS)
      bus: 1                     # I2C bus number (/dev/i2c-1)
      power_loss_pin:            # optional, any kind: a debounced GPIO pin (e.g. X728: 6)
        pin: 6
        active_high: true
        bounce_time: 0.05
      meter:                     # optional: how queries are metered
        sample_hz: 20
        overlap: full            # full | shared (see tensorslm.controller.power.energy_meter)
        baseline_seconds: 0      # > 0: measure the idle baseline at start and subtract it

Fields per kind (defaults in brackets):

* ``ina219``: bus [1], address [0x40], shunt_ohms, max_current_amps, current_lsb_amps [finest],
  invert_current [false]
* ``ups``: board, bus [1], address [the board's], internal_ohms [none: no sag correction]
* ``fuel_gauge``: bus [1], address [0x36], chip [max17048], cells_in_series [1], capacity_wh
* ``sysfs``: name [first battery], root [/sys/class/power_supply]
* ``rapl``: zone [intel-rapl:0], root [/sys/class/powercap]
* ``gpio``: pin [6], active_high [true], pull_up [none], bounce_time [0.05]
* ``simulated`` (a battery model, no hardware; see :mod:`.simulated_battery`):

  - ``load_board`` [raspberry-pi-4]: whose power model turns CPU time into the load
    (:data:`.power_model.BOARDS`; ``auto``: detect this machine, which off a Pi is the
    13 W-busy x86 laptop profile)
  - ``scope`` [system]: CPU time of the whole machine (``system``) or this process
  - ``capacity_wh`` [10]: energy of the full pack; ``soc_percent`` [100]: charge at start
  - ``cells`` [2] Li-ion cells in series; ``internal_ohms`` [0.15]: pack resistance (sag)
  - ``acceleration`` [1]: battery time runs this many times faster than the clock;
    ``tensorslm serve`` divides the policy's dwell and smoothing by it
    (:meth:`~tensorslm.controller.decision.policy.Policy.accelerated`)
  - ``external_power`` [false]: on a charger from the start; ``charge_watts`` [10]
* ``estimated``: board [auto: from the device tree], scope [process]

Every bad value raises ConfigError naming the file, the line and the field.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

from tensorslm.config_file import Section
from .energy_meter import OVERLAP_MODES, EnergyMeter, POWER_METHODS, COUNTER_METHODS
from tensorslm.controller.errors import ConfigError
from .power_model import BOARDS as BOARD_MODELS, CPU_SCOPES, EstimatedSource, board_model, detect_board
from .readings import PowerReading, PowerSource
from .ups_boards import BOARDS as UPS_BOARDS

log = logging.getLogger(__name__)

KINDS = ("ina219", "ups", "fuel_gauge", "sysfs", "rapl", "gpio", "simulated", "estimated")
# The simulated battery's load: the board the examples name, on any machine (a laptop's
# "auto" profile draws 13 W busy and would empty a small simulated pack in seconds).
SIMULATED_LOAD_BOARD = "raspberry-pi-4"


@dataclass(frozen=True)
class MeterSettings:
    sample_hz: float = 20.0
    overlap: str = "full"
    baseline_seconds: float = 0.0


def parse_meter_settings(section: Section | None) -> MeterSettings:
    """The optional ``meter:`` sub-section of ``power:``."""
    meter = section.section("meter", None) if section is not None else None
    if meter is None:
        return MeterSettings()
    settings = MeterSettings(
        sample_hz=meter.float("sample_hz", 20.0, minimum=0.1, maximum=1000.0),
        overlap=meter.choice("overlap", OVERLAP_MODES, "full"),
        baseline_seconds=meter.float("baseline_seconds", 0.0, minimum=0.0, maximum=600.0))
    meter.reject_unknown()
    return settings


class WithPowerLossPin:
    """A source whose readings also carry a GPIO pin's ``power_lost`` state."""

    def __init__(self, source: PowerSource, pin: PowerSource) -> None:
        self.source = source
        self.pin = pin
        self.method = source.method
        self.relative_uncertainty = source.relative_uncertainty

    def read(self) -> PowerReading:
        reading = self.source.read()
        lost = self.pin.read().power_lost
        external = reading.on_external_power if not lost else False
        return replace(reading, power_lost=lost, on_external_power=external)

    def close(self) -> None:
        self.source.close()
        self.pin.close()


def _address(section: Section, default: int, low: int, high: int) -> int:
    return section.int("address", default, minimum=low, maximum=high)


def _gpio(section: Section, clock: Callable[[], float]) -> PowerSource:
    from .gpio_power import PowerPinSource
    pull_up = section.bool("pull_up", None)
    return PowerPinSource(section.int("pin", 6, minimum=0, maximum=53),
                          active_high=section.bool("active_high", True), pull_up=pull_up,
                          bounce_time=section.float("bounce_time", 0.05, minimum=0.0, maximum=10.0),
                          clock=clock)


def _build(kind: str, s: Section, clock: Callable[[], float],
           bus_factory: Callable[[int], object] | None) -> PowerSource:
    def bus(number: int) -> dict:
        return {"bus": bus_factory(number)} if bus_factory is not None else {"bus_number": number}

    if kind == "ina219":
        from .ina219 import Ina219, Ina219Source
        driver = Ina219(shunt_ohms=s.float("shunt_ohms", minimum=1e-6),
                        max_current_amps=s.float("max_current_amps", minimum=1e-6),
                        current_lsb_amps=s.float("current_lsb_amps", None, minimum=1e-9),
                        address=_address(s, 0x40, 0x40, 0x4F),
                        **bus(s.int("bus", 1, minimum=0)))
        return Ina219Source(driver, invert_current=s.bool("invert_current", False), clock=clock)
    if kind == "ups":
        from .ups_boards import UpsBoardSource
        board = UPS_BOARDS[s.choice("board", sorted(UPS_BOARDS))]
        board = replace(board, internal_ohms=s.float("internal_ohms", board.internal_ohms,
                                                     minimum=0.0, maximum=10.0))
        return UpsBoardSource(board, **bus(s.int("bus", 1, minimum=0)),
                              address=_address(s, board.address, 0x40, 0x4F), clock=clock)
    if kind == "fuel_gauge":
        from .fuel_gauge import CHIPS, FuelGauge, FuelGaugeSource
        gauge = FuelGauge(**bus(s.int("bus", 1, minimum=0)),
                          address=_address(s, 0x36, 0x08, 0x77),
                          chip=s.choice("chip", CHIPS, "max17048"))
        return FuelGaugeSource(gauge, cells_in_series=s.int("cells_in_series", 1, minimum=1),
                               capacity_wh=s.float("capacity_wh", None, minimum=0.01), clock=clock)
    if kind == "sysfs":
        from .sysfs_battery import DEFAULT_ROOT, SysfsBatterySource
        return SysfsBatterySource(s.str("name", None), root=s.str("root", str(DEFAULT_ROOT)),
                                  clock=clock)
    if kind == "rapl":
        from .rapl import DEFAULT_ROOT, RaplSource
        return RaplSource(s.str("zone", "intel-rapl:0"), root=s.str("root", str(DEFAULT_ROOT)),
                          clock=clock)
    if kind == "gpio":
        return _gpio(s, clock)
    if kind == "simulated":
        from .simulated_battery import LoadEstimate, SimulatedBattery, SimulatedBatterySource
        load_board = s.choice("load_board", ["auto", *sorted(BOARD_MODELS)],
                              SIMULATED_LOAD_BOARD)
        model = board_model(detect_board() if load_board == "auto" else load_board)
        load = LoadEstimate(model, scope=s.choice("scope", sorted(CPU_SCOPES), "system"), clock=clock)
        battery = SimulatedBattery(
            capacity_wh=s.float("capacity_wh", 10.0, minimum=0.001),
            cells=s.int("cells", 2, minimum=1, maximum=8),
            internal_ohms=s.float("internal_ohms", 0.15, minimum=0.0, maximum=10.0),
            soc_percent=s.float("soc_percent", 100.0, minimum=0.0, maximum=100.0),
            acceleration=s.float("acceleration", 1.0, minimum=0.001, maximum=1e6),
            external_power=s.bool("external_power", False),
            charge_watts=s.float("charge_watts", 10.0, minimum=0.0), load=load, clock=clock)
        return SimulatedBatterySource(battery)
    # estimated
    name = s.choice("board", ["auto", *sorted(BOARD_MODELS)], "auto")
    model = board_model(detect_board() if name == "auto" else name)
    return EstimatedSource(model, scope=s.choice("scope", sorted(CPU_SCOPES), "process"), clock=clock)


def time_acceleration(section: Section) -> float:
    """How many times faster than the clock the configured source's time runs: the
    ``simulated`` kind's ``acceleration``, 1 for every real sensor."""
    if section.plain.get("kind") != "simulated":
        return 1.0
    return section.float("acceleration", 1.0, minimum=0.001, maximum=1e6)


def open_source(section: Section, *, clock: Callable[[], float] = time.monotonic,
                bus_factory: Callable[[int], object] | None = None) -> PowerSource:
    """The PowerSource the ``power:`` section describes (hardware opened now).

    ``bus_factory`` (bus number -> SMBus-like object) replaces opening /dev/i2c-N; tests
    and the demo pass one returning a :class:`~tensorslm.controller.power.ina219_sim.SimulatedSMBus`.

    Raises ConfigError (file, line, field) for bad values, HardwareLibraryMissing when the
    kind needs smbus2/gpiozero and they are absent, SensorError when the device is absent.
    """
    kind = section.choice("kind", KINDS)
    parse_meter_settings(section)                 # validated now, used by meter_for
    pin_section = section.section("power_loss_pin", None) if kind != "gpio" else None
    try:
        source = _build(kind, section, clock, bus_factory)
        section.reject_unknown()
        if pin_section is not None:
            pin = _gpio(pin_section, clock)
            pin_section.reject_unknown()
            source = WithPowerLossPin(source, pin)
    except ConfigError as exc:
        if exc.file is not None:
            raise
        raise ConfigError(exc.reason, file=section.file, line=section.line,
                          field=section.path or "power") from None
    log.info("power source: %s (%s)", kind, source.method)
    return source


def meter_for(source: PowerSource, section: Section | None = None, *,
              clock: Callable[[], float] = time.monotonic) -> EnergyMeter:
    """An EnergyMeter for ``source`` using the ``meter:`` settings of the same section.

    A source that measures neither power nor energy (a bare GPIO pin) gets the
    ``estimated`` meter of this board instead (logged). Power sensors get this board's
    estimate as fallback for windows they cannot cover (on external power a battery
    sensor does not see the load). When ``baseline_seconds`` > 0 the idle baseline is
    measured now (blocking for that long).
    """
    settings = parse_meter_settings(section)
    if source.method in POWER_METHODS:
        meter = EnergyMeter(source, sample_hz=settings.sample_hz, overlap=settings.overlap,
                            clock=clock, fallback=board_model(detect_board()))
    elif source.method in COUNTER_METHODS:
        meter = EnergyMeter(source, sample_hz=settings.sample_hz, overlap=settings.overlap,
                            clock=clock)
    else:
        board = detect_board()
        log.info("%s source measures no power; metering queries with the %s estimate",
                 source.method, board)
        meter = EnergyMeter(model=board_model(board), sample_hz=settings.sample_hz,
                            overlap=settings.overlap, clock=clock)
    if settings.baseline_seconds > 0:
        meter.measure_baseline(settings.baseline_seconds)
    return meter

"""Cost of metering, and what the estimate says about a CPU-bound query on this machine.

Run: python bench/bench_meter.py [--seconds 2] [--rates 20,100]

1. Sampler overhead: a window held open for ``--seconds`` on an INA219 read through the
   real driver and the register-level simulator; reports the process CPU time the sampler
   thread used per second of window (on a Pi the I2C transfer adds ~0.5 ms per read at
   100 kHz, not counted here).
2. begin()/end() latency of one window (mean over many).
3. A CPU-bound workload (pure-Python loop) metered with the ``estimated`` method under
   each board model: joules, mean watts and the one-sigma uncertainty.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

from tensorslm.controller.power.energy_meter import EnergyMeter
from tensorslm.controller.power.ina219 import Ina219, Ina219Source
from tensorslm.controller.power.ina219_sim import Ina219Model, SimulatedSMBus
from tensorslm.controller.power.power_model import BOARDS


def sampler_overhead(rate: float, seconds: float) -> tuple[float, int]:
    chip = Ina219Model(shunt_ohms=0.1, bus_volts=5.1, shunt_amps=0.6)
    driver = Ina219(shunt_ohms=0.1, max_current_amps=3.2, bus=SimulatedSMBus({0x40: chip}))
    meter = EnergyMeter(Ina219Source(driver), sample_hz=rate)
    idle_cpu = time.thread_time()
    cpu0 = time.process_time()
    with meter.measure() as w:
        time.sleep(seconds)
    cpu = time.process_time() - cpu0 - (time.thread_time() - idle_cpu)
    meter.close()
    return cpu / w.report.seconds, w.report.samples


def window_latency(n: int = 2000) -> float:
    chip = Ina219Model(shunt_ohms=0.1, bus_volts=5.1, shunt_amps=0.6)
    driver = Ina219(shunt_ohms=0.1, max_current_amps=3.2, bus=SimulatedSMBus({0x40: chip}))
    meter = EnergyMeter(Ina219Source(driver), sampler=False)
    t0 = time.perf_counter()
    for _ in range(n):
        meter.end(meter.begin())
    return (time.perf_counter() - t0) / n


def busy(seconds: float) -> int:
    end, x = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        x += 1
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rates", default="20,100")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    for rate in (float(r) for r in args.rates.split(",")):
        frac, samples = sampler_overhead(rate, args.seconds)
        print(f"sampler {rate:5.0f} Hz: {samples} samples in {args.seconds:.1f} s, "
              f"CPU {1000 * frac:.2f} ms per second ({100 * frac:.3f} % of one core)")
    print(f"begin()+end() of one window (2 INA219 reads, sim): {1e6 * window_latency():.0f} us")
    for name, board in BOARDS.items():
        meter = EnergyMeter(model=board, sampler=False)
        with meter.measure() as w:
            busy(0.5)
        r = w.report
        print(f"estimated {name:15s}: 0.5 s busy loop -> {r.joules:.2f} J +- "
              f"{r.uncertainty_joules:.2f} J, mean {r.mean_watts:.2f} W over {r.seconds:.2f} s")


if __name__ == "__main__":
    main()

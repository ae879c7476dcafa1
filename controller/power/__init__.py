"""Power sources behind one interface (:class:`readings.PowerSource`), one module per backend
(INA219 over smbus2, MAX17048 fuel gauge, UPS boards, the Linux battery interface, RAPL, a
GPIO pin through gpiozero, the ``estimated`` board model), each hardware backend beside the
register-level simulator that tests and the demo drive it with; and the energy meter that
turns any of them into joules per query. Hardware libraries are imported lazily."""

"""Energy policies (YAML into frozen dataclasses), the pure decision from readings to an
operating point, the control loop that applies it, and trace replay for ``policy simulate``.
Knows power only through :mod:`tensorslm.controller.power.readings`."""

"""Power sensing and energy policies: :mod:`.power` (sources, simulators, metering) and
:mod:`.decision` (policies, the decision, the control loop). Knows nothing of MQTT, the model
or the rank store: imports only :mod:`tensorslm.errors` and :mod:`tensorslm.config_file`."""

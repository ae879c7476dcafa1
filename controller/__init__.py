"""Power sensing and energy policies: :mod:`.power` (sources, simulators, metering) and
:mod:`.decision` (policies, the decision, the control loop). Knows nothing of MQTT, the model
or the rank store: imports only the shared root (:mod:`tensorslm.errors`,
:mod:`tensorslm.config_file`, :mod:`tensorslm.constants`)."""

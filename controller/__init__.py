"""Power sensing, per-query energy metering, YAML energy policies and run-time switching of
the operating point. Knows nothing of MQTT."""

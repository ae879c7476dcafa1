"""The on-Pi daemon and the wire contract it owns.

The daemon: ``daemon`` (serves prompts over MQTT), ``wiring`` (a config to a serving agent),
``actuator``, ``generation``, ``query_log``, ``outbox``, ``ladder_update``, ``systemd_notify``.
The wire contract, which the central side (:mod:`tensorslm.fleet`) uses too: ``protocol``,
``topics``, ``broker_config``, ``client``, ``record_schema``.
Uses :mod:`tensorslm.controller` and :mod:`tensorslm.rank_store`; never the fleet or the CLI."""

"""The central side of a fleet: the collector (records, status and telemetry from MQTT into one
SQLite file), the central database, the Datasette dashboard and Home Assistant discovery.

Depends on the wire contract of :mod:`tensorslm.agent` only (``protocol``, ``topics``,
``broker_config``, ``client``, ``record_schema``, ``systemd_notify``, ``errors``); never on
the daemon or the rank store, so a central machine needs no torch (``tests/test_architecture.py``
checks it)."""

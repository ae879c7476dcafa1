"""The on-Pi daemon and the wire contract it owns.

The daemon: ``daemon`` (serves prompts over MQTT; the ``Controller`` and ``Meter`` it needs),
``wiring`` (a config to a serving agent, and the one choice of engine), ``config``
(``agent.yaml``), ``generation`` (the ``Generator`` protocol and the transformers generator),
``prompting``, ``actuator``, ``query_log``, ``outbox``, ``ladder_update``.
The wire contract, which the central side (:mod:`tensorslm.fleet`) uses too and which imports
no torch: ``protocol``, ``topics``, ``broker_config`` (the one ``BrokerConfig``), ``client``
(the one paho client factory), ``record_schema`` (the record columns and the one migration
runner), ``systemd_notify`` (the notifier and the signal pattern of every service), ``errors``.
Uses :mod:`tensorslm.controller` and :mod:`tensorslm.rank_store`; never the fleet or the CLI."""

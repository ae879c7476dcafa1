"""The MQTT daemon that serves prompts, the query log, and the command-line interface."""

"""Training-free tensor-train compression of token embeddings, the ladder of rungs on disk,
and the drop-in embedding module. Knows nothing of power or MQTT."""

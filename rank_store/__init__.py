"""Training-free tensor-train compression of token embeddings, the ladder of rungs on disk, the
drop-in embedding module and the compressed-domain head, and the kernels they run on. Knows
nothing of power or MQTT: imports no other room of tensorslm."""

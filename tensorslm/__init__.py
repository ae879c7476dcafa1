"""tensorslm: small language models on Raspberry Pis, with tensor-train compressed embeddings
switched at run time by energy policies.

One import namespace, four rooms by where the code runs, and the command line on top:

=========================  ==============================================================
``tensorslm.rank_store``   compression maths, the store on disk, the embedding and the
                           compressed-domain head, the kernels they run on (folder
                           ``rank_store/``). Imports no other room.
``tensorslm.controller``   ``power``: power sources and their simulators, energy metering;
                           ``decision``: policies, the decision and the control loop
                           (folder ``controller/``). Imports no other room.
``tensorslm.agent``        the on-Pi daemon and the wire contract it owns: protocol, topics,
                           broker config, record schema (folder ``agent/``). Uses
                           ``controller`` and ``rank_store``.
``tensorslm.fleet``        the central side: collector, central database, dashboard, Home
                           Assistant discovery (folder ``fleet/``). Uses only the wire
                           contract of ``agent``.
``tensorslm.cli``          the ``tensorslm`` command and the demo. Uses everything; nothing
                           imports it.
=========================  ==============================================================

Shared by every room and importing none: :mod:`tensorslm.errors` (the one base exception),
:mod:`tensorslm.config_file` (YAML read with file, line and field in every error) and
:mod:`tensorslm.constants` (names and values more than one room uses; imports no torch).
"""

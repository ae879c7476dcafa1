"""Names and values that more than one room uses. Imports nothing (no torch), so the agent's
config parser, the policy parser and the CLI can use them without loading the model stack."""
from __future__ import annotations

#: the rung that serves the uncompressed table; every store has it
FULL_RUNG = "full"

#: how the LM head is computed: ``dense`` keeps the model's own matrix, ``tied`` uses the
#: active rung (the table is both the input embedding and the output head)
HEAD_DENSE = "dense"
HEAD_TIED = "tied"
HEAD_MODES = (HEAD_DENSE, HEAD_TIED)

#: bytes of one stored quantisation scale (float16), per token per core or per row
SCALE_BYTES = 2

#: the compression ratios of ``tensorslm compress --ladder auto``: one frontier rung each, none
#: dominated by another on the measured frontier with the default head, tied
#: (bench/results/frontier.md; exact TT with int8 cores, the recipe for 2x, is no better than
#: per-row int8 at 4x on either model, so 2 is not among them). 6 is whole rows of int8, int6 and
#: grouped int4 (the cheapest rung per token within +1% perplexity on Gemma-3-270m:
#: bench/results/rung_energy_gemma.md; with the tied head 0.6% (Gemma) and 1.2% (SmolLM2) above
#: 4x, beyond the evaluation's noise). tests/test_frontier.py checks the rule against
#: bench/results/frontier.json.
AUTO_LADDER_BUDGETS = (4, 6, 8, 16)

#: body precisions (the weights of the transformer's linear layers) the engine serves, by name;
#: a store keeps each precomputed once (tensorslm.rank_store.body), a policy point may name one
BODY_PRECISIONS = ("fp32", "bf16", "int8", "int4", "w8a8")
#: the body an agent serves unless agent.yaml or the policy says otherwise: int8 weights, and
#: int8 activations where the CPU has an int8 x int8 engine (else the int8 kernels): the cheapest
#: per token and per prompt whose perplexity stays within +1% of fp32 on both models without
#: calibration text (docs/engine.md has the figures). A store's int8 body serves it too.
DEFAULT_BODY_PRECISION = "w8a8"

#: OpenMP settings of every ``tensorslm`` process (the systemd unit sets the same), exported
#: before torch is imported: libgomp reads them when torch loads it. A worker spins up to
#: GOMP_SPINCOUNT iterations after each parallel region, then sleeps. libgomp's default
#: (300,000) collapses a 2-thread decode on a CPU that other processes keep busy, and
#: OMP_WAIT_POLICY=PASSIVE (no spin) makes a 2-thread decode slower than one thread; at one
#: thread there is no worker and neither matters (docs/engine.md, Threads).
OPENMP_ENV = {"GOMP_SPINCOUNT": "30000"}

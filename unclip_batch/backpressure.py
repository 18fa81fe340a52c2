"""How far the job reads ahead of its model: a Ray Data backpressure policy.

Ray Data lets an operator run ahead of the next as long as its queued output fits the object-store
budget. Our read stage's output is small (a model block of validated rows, ~60 KB), so on a 2-core node
the read ran through the whole manifest long before the model did, and every queued block cost the
driver memory (its reference, its metadata, and the block itself when Ray returns it inline): ~62 KB of
driver memory per queued block, measured (benchmarks/README.md, "The driver's memory, found"). A 3M-row
manifest would queue ~10,000 blocks there; 100M rows, as many as the object store takes.

``ReadAhead`` holds the read while ``blocks`` of the blocks it made have not yet reached the model: enough
to keep every model actor fed, and a bound that does not grow with the manifest. It reaches into Ray
Data 2.60's internals (its policy hook, operator names and metrics); a test says when they move.
"""

from __future__ import annotations

from ray.data._internal.execution.backpressure_policy import (
    ENABLED_BACKPRESSURE_POLICIES,
    ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
    BackpressurePolicy,
)

READ_AHEAD_KEY = "unclip_batch.read_ahead_blocks"
BLOCKS_PER_MODEL_WORKER = 16
MIN_BLOCKS = 64  # ~20 s of the null model's pace on 2 cores; a real model's call takes longer


def blocks_for(workers: int) -> int:
    return max(MIN_BLOCKS, BLOCKS_PER_MODEL_WORKER * workers)


def bound_read_ahead(context, *, read: str, model: str, blocks: int) -> None:
    """Hold operator ``read`` (a name part) while ``blocks`` of its blocks have not entered ``model``."""
    context.set_config(READ_AHEAD_KEY, (read, model, blocks))
    context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, [*ENABLED_BACKPRESSURE_POLICIES, ReadAhead])


class ReadAhead(BackpressurePolicy):
    @property
    def name(self) -> str:
        return "ReadAhead"

    def __init__(self, data_context, topology, resource_manager):
        super().__init__(data_context, topology, resource_manager)
        self._read, self._model, self._blocks = data_context.get_config(READ_AHEAD_KEY, (None, None, 0))
        self._reads = [op for op in topology if self._read and self._read in op.name]
        self._models = [op for op in topology if self._model and self._model in op.name]

    def ahead(self) -> int:
        """Blocks the read has made, or is making (a running read task makes at least one), that the model
        has not taken in yet (queued, or loading sources)."""
        made = sum(op.metrics.num_task_outputs_generated + op.metrics.num_tasks_running for op in self._reads)
        return made - sum(op.metrics.num_inputs_received for op in self._models)

    def can_add_input(self, op) -> bool:
        if op not in self._reads or not self._models:
            return True
        return self.ahead() < self._blocks

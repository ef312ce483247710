"""The prune engine: one flow (:mod:`.flow`, :class:`PruneRun`) from a resolved run description
(:mod:`..description`) to the saved output and its record, in stages (:mod:`.stages`: load, calibrate, allocate,
prune the blocks, evaluate, save), whatever holds the model (:mod:`.source`: the protocol;
:mod:`.in_memory` and :mod:`.sharded`: the two sources; :mod:`.blockwise`: the block-by-block walk of the
shards), on one process or block-parallel ranks (:mod:`.parallel`).
"""
from ..offload import OffloadedModel  # noqa: F401  (the sharded source's storage; tests patch it here)
from .blockwise import prune_offloaded
from .flow import PruneRun
from .in_memory import InMemorySource, prune_model_distributed, prune_model_parallel
from .parallel import run_blocks_parallel
from .sharded import ShardedSource
from .source import ModelSource

__all__ = ["PruneRun", "ModelSource", "InMemorySource", "ShardedSource", "run_blocks_parallel",
           "prune_model_parallel", "prune_model_distributed", "prune_offloaded"]

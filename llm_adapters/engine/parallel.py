"""The block-parallel runner: the blocks of a model source pruned on several processes (``--nproc N``, or the
ranks of a torchrun). Rank 0 spawns the workers (each builds its own source from the source's
``worker_recipe()``), every rank prunes its own blocks (:func:`~..distributed.assign_blocks`) on rank 0's
calibration tokens, the ranks exchange their records and the source gathers the pruned blocks; rank 0 merges
the records in block order. Process and communication mechanics live in :mod:`..distributed`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import time
from typing import Optional

import torch

from ..distributed import (ENV_ASSIGNMENT, DistContext, DistributedError, broadcast_inputs, check_parallel_mode,
                           device_for_rank, tcp_addresses, assign_blocks, distributed_context, env_world, exchange,
                           world_for)
from ..pipeline import forward_batch_size, peak_rss_mb

__all__ = ["run_blocks_parallel", "prune_rank", "merge_records"]


def run_blocks_parallel(source, calib_ids, config, *, nproc: int, progress: bool = True,
                        assignment: Optional[str] = None) -> Optional[dict]:
    """The blocks of ``source`` pruned on ``nproc`` processes (or the ranks of a torchrun): this process is rank
    0 and spawns ``nproc − 1`` workers that build their own source from ``source.worker_recipe()``. Returns the
    merged record on rank 0, ``None`` elsewhere (see :mod:`.distributed` for launch, transfer and errors)."""
    from ..pipeline import validate_config
    world = world_for(nproc)
    check_parallel_mode(config)
    validate_config(source.model, config, calib_ids)  # bad input: the same one-line error on every rank
    assignment = assignment or os.environ.get(ENV_ASSIGNMENT)
    assign_blocks([0], 1, assignment)  # checks the name
    if env_world() is None and not source.spawnable():
        raise DistributedError("nproc > 1 needs a model source the workers can load (source=(name, model_dir))")
    with distributed_context(world, _spawned_worker, (source.worker_recipe(), config, assignment),
                             device=config.device) as ctx:
        if progress and ctx.rank == 0:
            where = "loopback 127.0.0.1" if ctx.launcher == "spawn" else \
                "MASTER_ADDR " + os.environ.get("MASTER_ADDR", "?")
            print(f"optprune: block-parallel pruning on {ctx.world} processes ({ctx.backend}, {ctx.launcher}; "
                  f"{where})", file=sys.stderr)
        return prune_rank(ctx, source, calib_ids, config, progress=progress, assignment=assignment)


def _spawned_worker(recipe, config, assignment):
    """A spawned worker (rank ≥ 1): its own source (its own model or skeleton), its own blocks."""
    with distributed_context(1, device=config.device) as ctx:  # env set by the spawning parent → joins the group
        source, err = None, None
        try:
            cls, args = recipe  # the source class itself (pickled by reference) and its arguments
            source = cls.for_worker(*args)
        except Exception as e:
            err = e
        prune_rank(ctx, source, None, config, progress=False, assignment=assignment, error=err)


def prune_rank(ctx: DistContext, source, calib_ids, config, *, progress: bool = True,
               assignment: Optional[str] = None, error: Optional[BaseException] = None) -> Optional[dict]:
    """Every rank of ``ctx``: prune this rank's blocks of ``source`` on rank 0's calibration tokens and config,
    exchange the records, gather the pruned blocks (the source's way). Rank 0 returns the merged record; the
    other ranks ``None``. ``error``: this rank already failed (e.g. loading); it still takes part in the exchange."""
    from ..pipeline import validate_config
    t0 = time.perf_counter()
    calib_ids, config = broadcast_inputs(ctx, calib_ids, config)
    t_ready = time.perf_counter()  # every rank is up (rank 0 waited here for the spawned workers to start)
    cpu0 = time.process_time()
    import torch.distributed as dist
    dist.barrier()  # rank 0 has prepared the output (sharded: cleaned it) before anyone writes
    check_parallel_mode(config)
    config = dataclasses.replace(config, device=device_for_rank(config.device, ctx.local_rank, ctx.backend))
    plan, err, mine = None, error, []
    local = {"layers": [], "blocks": []}
    if err is None:
        try:
            plan = validate_config(source.model, config, calib_ids)
            mine = assign_blocks(plan.blocks, ctx.world, assignment)[ctx.rank]
            local = source.prune_rank(calib_ids, config, mine, progress and ctx.rank == 0)
        except Exception as e:  # reported through the exchange; rank 0 re-raises
            err = e
    summary = {"blocks_owned": mine, "host": socket.gethostname(), "threads": torch.get_num_threads(),
               "device": str(config.device), "tcp_addresses": tcp_addresses(), **local,
               "prune_time_s": time.perf_counter() - t0, "wait_s": t_ready - t0,
               "work_s": time.perf_counter() - t_ready, "cpu_s": time.process_time() - cpu0,
               "peak_rss_mb": peak_rss_mb(), "forward_blocks": (min(mine) if mine else 0),
               "structured": None if plan is None else bool(plan.spec.structured)}
    proceed, gathered = exchange(ctx, summary, err)
    if not proceed:  # another rank failed; rank 0 has raised
        return None
    t_x = time.perf_counter()
    owners = assign_blocks(plan.blocks, ctx.world, assignment)
    nbytes = source.gather(ctx, plan, owners)
    t_transfer = time.perf_counter() - t_x
    if ctx.rank != 0:
        return None
    res = merge_records(gathered, ctx, owners=owners, assignment=assignment, calib_ids=calib_ids, config=config,
                        wall=time.perf_counter() - t0, t_transfer=t_transfer, nbytes=nbytes)
    source.finish_merge(res, gathered, plan, t0, t_ready)
    return res


def merge_records(gathered: list, ctx: DistContext, *, owners, assignment, calib_ids, config, wall: float,
                  t_transfer: float, nbytes: int) -> dict:
    """One record from the ranks' records, in block order (the same order as the single-process run)."""
    layers = [r for g in gathered for r in (g.get("layers") or [])]
    layers.sort(key=lambda r: r["block"])  # stable: sub-layer order within a block is kept
    blocks = sorted((r for g in gathered for r in (g.get("blocks") or [])), key=lambda r: r["block"])
    tot = sum(math.prod(r["shape"]) for r in layers)
    zeros = sum(r["sparsity"] * math.prod(r["shape"]) for r in layers)
    threads = sorted({g["threads"] for g in gathered})
    addrs = sorted({a for g in gathered for a in g.get("tcp_addresses") or []})
    ranks = [{k: g.get(k) for k in ("rank", "host", "blocks_owned", "forward_blocks", "threads", "device",
                                     "prune_time_s", "wait_s", "work_s", "cpu_s", "time_s", "peak_rss_mb",
                                     "peak_cuda_mb", "tcp_addresses")}
             for g in gathered]
    res = {"layers": layers, "blocks": blocks, "time_s": wall,
           "peak_rss_mb": max(g.get("peak_rss_mb") or 0.0 for g in gathered),
           "sparsity": zeros / tot if tot else 0.0, "device": gathered[0].get("device"),
           "nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
           "batch_size": forward_batch_size(config.batch_size, *calib_ids.shape),
           "distributed": {"world_size": ctx.world, "backend": ctx.backend, "launcher": ctx.launcher,
                           "assignment": (assignment or os.environ.get(ENV_ASSIGNMENT) or "contiguous"),
                           "owners": owners, "threads": threads, "tcp_addresses": addrs,
                           "transfer_time_s": t_transfer, "transfer_mb": nbytes / 2 ** 20, "ranks": ranks}}
    cuda = [g.get("peak_cuda_mb") for g in gathered if g.get("peak_cuda_mb") is not None]
    if cuda:
        res["peak_cuda_mb"] = max(cuda)
    if len(threads) > 1:
        res["distributed"]["warning"] = (f"ranks ran with different thread counts {threads}: results may differ "
                                         f"in the last bits from a single-process run")
    return res

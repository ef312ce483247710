"""Block-parallel pruning on ``torch.distributed``: the process and communication mechanics.

In ``mode="dense-input"`` every decoder block is pruned on the inputs the *dense* model gives it, so blocks are
independent: ``prune_model(model, ids, PruneConfig(mode="dense-input", blocks=[i]))`` prunes block ``i`` bit for
bit as the full run does. The engine (:func:`~optprune.llm_adapters.engine.run_blocks_parallel`) runs those
per-block jobs on several processes with ``torch.distributed`` (gloo on CPU, NCCL on GPUs) and gathers the
results into one model and one run record on rank 0; this module holds what it needs for that: the process
group (:func:`distributed_context`), the block assignment (:func:`assign_blocks`), the agreement on success
(:func:`exchange`), tensor transfer and the broadcast of rank 0's inputs.

**Launch.** Two entry points, one code path:

* ``optprune prune ... --mode dense-input --nproc N``: the calling process becomes rank 0 and starts ``N − 1``
  workers with ``torch.multiprocessing`` (start method ``spawn``). Rendezvous goes through a
  ``torch.distributed.FileStore`` in a private temporary folder (no listening socket at all), and gloo's
  sockets are pinned to the loopback interface (``GLOO_SOCKET_IFNAME=lo``): **only 127.0.0.1 is used**. Each
  worker loads the model itself from the same source, with the caller's ``torch`` thread count.
* ``torchrun --nproc-per-node N -m optprune prune ...`` (or ``python -m torch.distributed.run``): every rank
  runs the whole command; ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` come from
  torchrun (the user's cluster supplies ``--master-addr``; our tests use 127.0.0.1). Rank 0 evaluates, saves
  and writes ``run.json``; the other ranks return ``None`` right after the pruning.

**Who computes the dense inputs.** Every rank computes them itself: it captures the block inputs from the
(broadcast) calibration tokens and runs the *dense* blocks up to its own blocks (``prune_model`` does exactly
that with ``blocks=mine``). There is no activation traffic — for a 7B model one block's inputs are
``nsamples × seqlen × hidden`` = 128·2048·4096 floats = 4 GiB, while a dense block forward costs a fraction of
pruning it — at the price of ``start_r`` extra dense block forwards on rank ``r``.

**Assignment** (``assignment=`` / ``$OPTPRUNE_BLOCK_ASSIGNMENT``): ``"contiguous"`` (default) gives each rank
a contiguous run of blocks, balanced for ``first_block × FORWARD_COST + number_of_blocks`` (rank ``r`` first
forwards the dense blocks before its own, each ≈ 0.2 of pruning one), so earlier ranks get a few more blocks;
``"round-robin"`` gives the ``j``-th block to rank ``j mod N`` (every rank then forwards almost the whole model).
Contiguous is also what the low-memory mode wants: a rank never loads a block past its last one. Limit: the last
rank's chain of dense forwards grows with the depth, so beyond N ≈ 1/FORWARD_COST ranks it dominates (see the
capacity plan in docs/results.md).

**What travels.** Rank 0 broadcasts the calibration tokens and the :class:`PruneConfig` (so every rank prunes
with rank 0's data, also under torchrun where each rank sampled them itself). After pruning, every rank sends
its per-layer/per-block records (``gather_object``) and status; on success the owners send each pruned block to
rank 0, block by block and tensor by tensor (``send``/``recv`` into rank 0's own tensors of the same shape); a
structured method's shrunk block travels as one pickled module (``send_object_list``) and replaces rank 0's.
With NCCL the tensors are staged through the rank's GPU. With ``--low-memory`` nothing travels: every rank writes
its own block shards into the output directory (one machine, or a shared filesystem) and rank 0 writes the rest.

**Bit for bit.** Each rank runs the same code on the same weights, tokens, batches and dtype as the
single-process dense-input run, so the pruned weights are identical *provided the thread count is the same*
(float sums in BLAS kernels depend on it): spawned workers take the caller's ``torch.get_num_threads()``;
torchrun sets ``OMP_NUM_THREADS=1`` unless told otherwise — compare with a single-process run at 1 thread.
The record lists every rank's thread count and warns when they differ.

**Errors.** Bad input is checked on every rank before any collective (the same one-line ``ValueError`` on each).
A failure while pruning is reported through the gather (rank 0 raises :class:`RankFailed` naming the rank and
the error; a rank-0 exception is re-raised as is); a crashed process closes its gloo sockets and the peers'
collectives fail instead of hanging. ``$OPTPRUNE_DIST_TIMEOUT`` (seconds, default 3600) bounds every
collective.

The sequential (pruned-input) mode stays single-process: ``--nproc > 1`` (or a torchrun world > 1) with
``mode="sequential"`` is an error that says to use ``--mode dense-input``.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

__all__ = ["DistributedError", "RankFailed", "ASSIGNMENTS", "assign_blocks", "env_world", "loopback_interface",
           "choose_backend", "distributed_context", "exchange", "DistContext", "world_for",
           "tcp_addresses", "device_for_rank", "send_tensor", "recv_into", "broadcast_inputs", "check_parallel_mode"]

ASSIGNMENTS = ("contiguous", "round-robin")
ENV_ASSIGNMENT = "OPTPRUNE_BLOCK_ASSIGNMENT"
ENV_BACKEND = "OPTPRUNE_DIST_BACKEND"
ENV_TIMEOUT = "OPTPRUNE_DIST_TIMEOUT"
_ENV_FILESTORE = "OPTPRUNE_DIST_FILESTORE"  # set for spawned workers: the FileStore of the parent
_SPAWN_STORE = None  # a spawned worker's handle on that FileStore


class DistributedError(ValueError):
    """Bad input for block-parallel pruning (one line; raised before anything is touched)."""


class RankFailed(RuntimeError):
    """A rank failed while pruning; the message names the rank and its error."""


# ============================================================================================ small helpers
def env_world() -> Optional[tuple]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's environment, or None outside one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank, world, local, local_world


def world_for(nproc: int) -> int:
    """The world size a run will have: torchrun's when launched by it, else ``nproc``."""
    env = env_world()
    nproc = int(nproc or 1)
    if env is None:
        return nproc
    if nproc > 1 and nproc != env[1]:
        raise DistributedError(f"--nproc {nproc} disagrees with torchrun's WORLD_SIZE={env[1]}; under torchrun "
                               f"leave --nproc out (the world size comes from --nproc-per-node × --nnodes)")
    return env[1]


#: cost of forwarding one dense block relative to pruning one (for the contiguous split): ≈ 1 of the ~5 block
#: passes that statistics with error correction take (see benchmarks/models/bench_distributed.py's FLOP model)
FORWARD_COST = 0.2


def assign_blocks(blocks, world: int, how: Optional[str] = None, forward_cost: float = FORWARD_COST) -> list:
    """Blocks (indices) → one sorted list per rank (see the module doc).

    ``"contiguous"``: rank ``r`` gets a contiguous run; the runs are balanced for the cost
    ``first_index·forward_cost + count`` (rank ``r`` forwards the dense blocks before its first one, then prunes its
    own), i.e. earlier ranks get more blocks. ``"round-robin"``: block ``blocks[j]`` → rank ``j mod world``.
    Deterministic: every rank computes the same assignment."""
    how = (how or os.environ.get(ENV_ASSIGNMENT) or "contiguous").strip().lower().replace("_", "-")
    if how not in ASSIGNMENTS:
        raise DistributedError(f"block assignment must be one of {', '.join(ASSIGNMENTS)}, got {how!r}")
    blocks = sorted(int(b) for b in blocks)
    world = int(world)
    if how == "round-robin":
        return [blocks[r::world] for r in range(world)]
    f = max(0.0, float(forward_cost))

    def greedy(T):
        out, i = [], 0
        for r in range(world):
            j = i
            while j < len(blocks) and (blocks[i] * f + (j - i + 1)) <= T + 1e-9:
                j += 1
            if r == world - 1:
                j = len(blocks)
            out.append(blocks[i:j])
            i = j
        return out

    def cost(parts):
        return max((p[0] * f + len(p)) if p else 0.0 for p in parts)

    lo, hi = 0.0, (blocks[-1] * f + len(blocks)) if blocks else 0.0
    for _ in range(60):  # smallest bottleneck cost a greedy split achieves
        mid = (lo + hi) / 2
        if cost(greedy(mid)) <= mid + 1e-9:
            hi = mid
        else:
            lo = mid
    return greedy(hi)


def loopback_interface() -> str:
    """The name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS)."""
    try:
        names = [n for _, n in socket.if_nameindex()]
    except (OSError, AttributeError):  # pragma: no cover
        names = []
    for n in names:
        if n == "lo" or n.startswith("lo0"):
            return n
    for n in names:
        if n.startswith("lo"):
            return n
    return "lo"


def choose_backend(device, local_world: Optional[int] = None) -> str:
    """``$OPTPRUNE_DIST_BACKEND`` if set; NCCL when computing on CUDA and every local rank has its own GPU;
    gloo otherwise (CPU, or more ranks than GPUs: the transfers are of host tensors anyway).
    ``local_world``: processes on this machine (default: torchrun's ``LOCAL_WORLD_SIZE``, else 1)."""
    env = os.environ.get(ENV_BACKEND, "").strip().lower()
    if env:
        if env not in ("gloo", "nccl"):
            raise DistributedError(f"${ENV_BACKEND} must be gloo or nccl, got {env!r}")
        return env
    dev = str(device or "cpu")
    if dev.startswith("cuda") and torch.cuda.is_available() and dist.is_nccl_available():
        if local_world is None:
            ew = env_world()
            local_world = ew[3] if ew else 1
        if torch.cuda.device_count() >= local_world:
            return "nccl"
    return "gloo"


def _timeout() -> datetime.timedelta:
    try:
        s = float(os.environ.get(ENV_TIMEOUT, "3600"))
    except ValueError:
        s = 3600.0
    return datetime.timedelta(seconds=max(10.0, s))


def tcp_addresses() -> list:
    """IP addresses of this process's TCP sockets (local and remote ends): the loopback check of the tests."""
    try:
        import psutil
        conns = psutil.Process().net_connections(kind="tcp")
    except Exception:  # psutil missing or not permitted
        return []
    ips = set()
    for c in conns:
        for a in (c.laddr, c.raddr):
            if a:
                ips.add(a.ip)
    return sorted(ips)


# ============================================================================================ process group
@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    backend: str
    launcher: str          # "spawn" (optprune --nproc) or "torchrun"
    owns_group: bool       # this call initialised the group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def device_for_rank(device, local_rank: int, backend: str):
    """``cuda`` → ``cuda:<local_rank mod #GPUs>`` for a rank; anything else unchanged."""
    dev = str(device) if device is not None else None
    if dev is not None and dev == "cuda" and torch.cuda.is_available():
        n = torch.cuda.device_count()
        dev = f"cuda:{local_rank % n}"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(dev if dev and dev.startswith("cuda") else f"cuda:{local_rank}"))
    return dev


def _init_from_env(backend: str) -> DistContext:
    """Join the process group of a torchrun launch or of a spawning parent (``$OPTPRUNE_DIST_FILESTORE``)."""
    rank, world, local, _ = env_world()
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise DistributedError(f"a process group of size {dist.get_world_size()} is already initialised, "
                                   f"but WORLD_SIZE={world}")
        return DistContext(rank, world, local, dist.get_backend(), "torchrun", owns_group=False)
    store_path = os.environ.get(_ENV_FILESTORE)
    if backend == "nccl":
        torch.cuda.set_device(local % max(1, torch.cuda.device_count()))
    if store_path:
        store = _SPAWN_STORE if _SPAWN_STORE is not None else dist.FileStore(store_path, world)
        store.set(f"ready/{rank}", "1")  # the spawning parent waits for this before joining the group
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=_timeout())
        launcher = "spawn"
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=_timeout())
        launcher = "torchrun"
    return DistContext(rank, world, local, backend, launcher, owns_group=True)


def _spawned_entry(i: int, world: int, store_path: str, backend: str, threads: int, target: Callable, args: tuple):
    """Entry of a worker started by :func:`distributed_context` (rank ``i + 1``)."""
    global _SPAWN_STORE
    rank = i + 1
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", **{_ENV_FILESTORE: store_path})
    _SPAWN_STORE = dist.FileStore(store_path, world)
    target(*args)


@contextmanager
def distributed_context(nproc: int, target: Optional[Callable] = None, args: tuple = (), *, device=None):
    """A process group for block-parallel work, or None for a single process.

    * Under torchrun (``WORLD_SIZE > 1``): join (or reuse) torchrun's group.
    * ``nproc > 1`` otherwise: this process is rank 0; ``nproc − 1`` workers are spawned and run
      ``target(*args)`` (a top-level function that must itself call :func:`distributed_context` — it then finds
      the environment set up by :func:`_spawned_entry` — and take part in the same collectives).

    Yields a :class:`DistContext` (or ``None``). On leaving, the group this call made is destroyed and spawned
    workers are joined (a worker's exception is re-raised here unless one is already propagating).
    """
    world = world_for(nproc)
    if world <= 1:
        yield None
        return
    backend = choose_backend(device, None if env_world() is not None else world)
    if env_world() is not None:  # torchrun, or a worker spawned below
        ctx = _init_from_env(backend)
        try:
            yield ctx
        finally:
            if ctx.owns_group and dist.is_initialized():
                dist.destroy_process_group()
        return
    if target is None:
        raise DistributedError("nproc > 1 needs a worker target (see distributed_context)")
    import torch.multiprocessing as mp
    tmp = tempfile.mkdtemp(prefix="optprune-dist-")
    store_path = os.path.join(tmp, "store")
    saved_env = {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    lo = loopback_interface()
    os.environ["GLOO_SOCKET_IFNAME"] = lo  # inherited by the spawned workers: gloo binds to 127.0.0.1 only
    os.environ["NCCL_SOCKET_IFNAME"] = lo
    procs = None
    ctx = None
    try:
        store = dist.FileStore(store_path, world)
        procs = mp.start_processes(_spawned_entry, args=(world, store_path, backend, torch.get_num_threads(),
                                                         target, args),
                                   nprocs=world - 1, join=False, start_method="spawn")
        _wait_for_workers(store, procs, world)
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=_timeout())
        ctx = DistContext(0, world, 0, backend, "spawn", owns_group=True)
        yield ctx
    finally:
        failing = sys.exc_info()[0] is not None
        if dist.is_initialized() and ctx is not None:
            dist.destroy_process_group()
        try:
            if procs is not None:
                if failing:
                    _join_quietly(procs)
                else:
                    while not procs.join():
                        pass
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_workers(store, procs, world: int) -> None:
    """Wait until every spawned worker is about to join the group; a worker that dies first (import error, bad
    model, killed) raises :class:`RankFailed` at once instead of leaving rank 0 waiting for the timeout."""
    pending = set(range(1, world))
    deadline = time.time() + _timeout().total_seconds()
    while pending:
        pending = {r for r in pending if not store.check([f"ready/{r}"])}
        for i, p in enumerate(procs.processes):
            if p.exitcode is not None and (i + 1) in pending:
                raise RankFailed(f"worker rank {i + 1} exited (code {p.exitcode}) before joining the process group; "
                                 f"its traceback is above")
        if pending and time.time() > deadline:
            raise RankFailed(f"workers {sorted(pending)} did not start within ${ENV_TIMEOUT} seconds")
        if pending:
            time.sleep(0.05)


def _join_quietly(procs, grace: float = 30.0) -> None:
    """Join spawned workers after a failure on rank 0: wait a little, then terminate the ones still running."""
    deadline = time.time() + grace
    for p in procs.processes:
        p.join(max(0.0, deadline - time.time()))
    for p in procs.processes:
        if p.is_alive():
            p.terminate()
            p.join(5)


# ============================================================================================ the exchange
def exchange(ctx: DistContext, summary: dict, error: Optional[BaseException] = None) -> tuple:
    """Gather every rank's ``summary`` (a picklable dict) on rank 0 and agree on success.

    Returns ``(proceed, gathered)``: ``gathered`` is the list of summaries on rank 0 (``None`` elsewhere);
    ``proceed`` is True on every rank when every rank succeeded. If any rank failed, rank 0 raises (its own
    exception as is, or :class:`RankFailed` naming the first failing rank) and the other ranks get
    ``(False, None)`` — all after the same two collectives, so nobody is left waiting.
    """
    summary = dict(summary)
    summary["rank"] = ctx.rank
    summary["error"] = None if error is None else f"{type(error).__name__}: {error}"
    gathered = [None] * ctx.world if ctx.rank == 0 else None
    dist.gather_object(summary, gathered, dst=0)
    if ctx.rank == 0:
        bad = [g for g in gathered if g.get("error")]
        decision = [None if not bad else f"rank {bad[0]['rank']} failed: {bad[0]['error']}"]
    else:
        decision = [None]
    dist.broadcast_object_list(decision, src=0)
    if decision[0] is not None:
        if ctx.rank == 0:
            if error is not None:
                raise error
            raise RankFailed(decision[0])
        return False, None
    return True, gathered


def _xfer_device(ctx: DistContext):
    return torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")


def send_tensor(t: torch.Tensor, dst: int, ctx: DistContext) -> None:
    """Send ``t`` to rank ``dst`` (through the device the backend transfers on)."""
    dist.send(t.detach().to(_xfer_device(ctx)).contiguous(), dst=dst)


def recv_into(t: torch.Tensor, src: int, ctx: DistContext) -> None:
    """Receive rank ``src``'s tensor into ``t`` (same shape and dtype), on ``t``'s device."""
    buf = torch.empty(t.shape, dtype=t.dtype, device=_xfer_device(ctx))
    dist.recv(buf, src=src)
    t.copy_(buf.to(t.device))


# ============================================================================================ rank inputs
def broadcast_inputs(ctx: DistContext, calib_ids, config):
    """Rank 0's calibration tokens and config on every rank (device fields are per rank and kept)."""
    box = [(calib_ids.cpu() if calib_ids is not None else None, config) if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    ids, cfg0 = box[0]
    cfg = dataclasses.replace(cfg0, device=config.device if config is not None else cfg0.device)
    return ids, cfg


def check_parallel_mode(config) -> None:
    """Block-parallel pruning needs independent blocks: the dense-input mode (one-line error otherwise)."""
    if config.mode != "dense-input":
        raise DistributedError("block-parallel pruning (--nproc > 1 or torchrun) needs --mode dense-input "
                               "(independent blocks); the sequential mode stays single-process")

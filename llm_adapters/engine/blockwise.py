"""The block-by-block walk of a model stored in safetensors shards (``--low-memory``): one block at a time is
materialised, pruned through the pipeline on its stored inputs (a :class:`BlockView` makes it look like a
one-block model), written to its own output shard and released; the next block's inputs are computed from it.
Storage mechanics live in :mod:`..offload`.
"""
from __future__ import annotations

import dataclasses
import math
import time
import types
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..offload import OffloadError, OffloadedModel, forward_inplace, hidden_size, save_shard, write_rest_and_index
from ..architectures import get_module, linear_weight
from ..pipeline import BlockInputs, PipelineError, forward_batch_size, peak_rss_mb, prune_model, validate_config

__all__ = ["prune_offloaded", "BlockView"]


class BlockView(nn.Module):
    """A causal-LM look-alike holding one block, so that ``prune_model(view, ids, config, inputs=...)`` prunes
    exactly that block on the stored block inputs handed to it."""

    def __init__(self, config, arch, block, vocab):
        super().__init__()
        self.config = config
        parts = arch.blocks.split(".")
        parent = self
        for p in parts[:-1]:
            child = nn.Module()
            parent.add_module(p, child)
            parent = child
        parent.add_module(parts[-1], nn.ModuleList([block]))
        object.__setattr__(self, "optprune_arch", arch)  # get_arch: the full model's, not re-inferred
        object.__setattr__(self, "_emb", types.SimpleNamespace(num_embeddings=vocab))
        self.eval()  # prune_model restores the view's mode: a training-mode view would leave dropout on

    def get_input_embeddings(self):
        return self._emb


def _rename(rec: dict, prefix: str, i: int) -> dict:
    r = dict(rec)
    r["block"] = i
    if "name" in r and r["name"].startswith(f"{prefix}.0."):
        r["name"] = f"{prefix}.{i}." + r["name"][len(prefix) + 3:]
    return r


@torch.no_grad()
def prune_offloaded(om: OffloadedModel, calib_ids, config, out_dir, *, blocks: Optional[list] = None,
                    activation_dtype: Optional[torch.dtype] = None, progress: bool = True,
                    write_rest: bool = True) -> dict:
    """Prune the blocks ``blocks`` (default: ``config.blocks`` or all) of the checkpoint ``om`` one at a time and
    write their shards to ``out_dir``; with ``write_rest`` also the non-block shards, the unselected blocks,
    the index and the config. Returns the pipeline-style record (``layers``, ``blocks``, ...).

    Resident: one block (plus the pipeline's dense copy with error correction), the calibration set's block
    inputs once (in ``activation_dtype``; each batch is cast to the compute dtype as it enters the block), the
    Gram matrices of one group (uncorrected: of the block's groups, each freed once solved) and the
    embeddings only while the first inputs are captured. With the default activation dtype the pruned weights
    are bit for bit those of the in-memory run."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    plan = validate_config(om.model, config, calib_ids)
    if plan.spec.structured:
        raise OffloadError(f"--low-memory prunes unstructured/N:M methods; {plan.spec.name!r} is structured "
                           f"(it changes widths): use the in-memory path")
    mine = sorted(plan.blocks if blocks is None else blocks)
    dev = plan.device
    act_dtype = activation_dtype or om.dtype
    _, block_names = om.shard_names()
    out_dir.mkdir(parents=True, exist_ok=True)
    layers_rec, blocks_rec = [], []
    nz_before = nz_after = tot = 0
    last = mine[-1] if mine else -1

    t0 = time.perf_counter()
    inputs = om.capture(calib_ids, device=dev, batch_size=config.batch_size) if mine else None
    t_capture = time.perf_counter() - t0
    if inputs is not None:
        hidden = inputs.hidden.to("cpu", act_dtype)
        per_block = inputs.per_block  # each block's own masks / positional tables
        del inputs
    vocab = getattr(om.config, "vocab_size", None) or int(calib_ids.max()) + 1
    bar = tqdm(range(last + 1), desc=f"prune {plan.spec.name} (low memory)", unit="block", disable=not progress)
    for i in bar:
        tb = time.perf_counter()
        blk = om.block(i)
        if i not in mine:
            forward_inplace(blk, hidden, per_block[i], om.dtype, dev)
            om.release(i)
            continue
        nz, n = _count_weights(blk, plan.arch)
        nz_before, tot = nz_before + nz, tot + n
        layers, blks = _prune_block(om, plan, config, calib_ids, i, blk, BlockInputs(hidden, per_block[i]), vocab)
        layers_rec += layers
        blocks_rec += blks
        nz_after += _count_weights(blk, plan.arch)[0]
        tw = time.perf_counter()
        save_shard(om.block_tensors(i, blk), out_dir / block_names[i])
        t_write = time.perf_counter() - tw
        tf = time.perf_counter()
        if i != last:
            if config.mode == "dense-input":  # the next inputs come from the dense block: read it again
                om.release(i)
                blk = om.block(i)
            forward_inplace(blk, hidden, per_block[i], om.dtype, dev)
        om.release(i)
        blocks_rec[-1].update(write_time_s=t_write, next_inputs_time_s=time.perf_counter() - tf,
                              total_time_s=time.perf_counter() - tb)
    bar.close()
    if write_rest:
        write_rest_and_index(om, out_dir, skip=set(mine))
    return _walk_record(om, calib_ids, config, dev, act_dtype, layers=layers_rec, blocks=blocks_rec,
                        counts=(tot, nz_before, nz_after), t_capture=t_capture, t_start=t_start)


def _count_weights(blk, arch) -> tuple:
    """``(nonzero, total)`` weights of the block's prunable sub-layers."""
    nz = tot = 0
    for s in arch.sublayer_names():
        W = linear_weight(get_module(blk, s), s in arch.transposed)
        nz += int((W != 0).sum())
        tot += W.numel()
    return nz, tot


def _prune_block(om: OffloadedModel, plan, config, calib_ids, i: int, blk, inputs, vocab: int) -> tuple:
    """Block ``i`` pruned through the pipeline on its stored inputs, as the only block of a :class:`BlockView`;
    its layer and block records, named as block ``i``."""
    subs = [f"{om.prefix}.{i}.{s}" for s in plan.arch.sublayer_names()]
    ls = None
    if config.layer_sparsity:
        ls = {f"{om.prefix}.0.{n[len(om.prefix) + len(str(i)) + 2:]}": v
              for n, v in config.layer_sparsity.items() if n in subs}
    view = BlockView(om.config, plan.arch, blk, vocab)
    cfg = dataclasses.replace(config, blocks=[0], layer_sparsity=ls or None)
    try:  # one block, the last of the view: the pipeline reads the inputs and writes no outputs
        res = prune_model(view, calib_ids, cfg, progress=False, inputs=inputs)
    except PipelineError as e:
        raise PipelineError(f"block {i}: {e}") from None
    return [_rename(r, om.prefix, i) for r in res["layers"]], [_rename(r, om.prefix, i) for r in res["blocks"]]


def _walk_record(om: OffloadedModel, calib_ids, config, dev, act_dtype, *, layers: list, blocks: list,
                 counts: tuple, t_capture: float, t_start: float) -> dict:
    """The pipeline-style record of the walk, with its ``low_memory`` part (sizes, dtypes, weight counts)."""
    tot, nz_before, nz_after = counts
    tot_all = sum(math.prod(r["shape"]) for r in layers)
    zeros = sum(r["sparsity"] * math.prod(r["shape"]) for r in layers)
    res = {"layers": layers, "blocks": blocks, "time_s": time.perf_counter() - t_start,
           "peak_rss_mb": peak_rss_mb(), "sparsity": zeros / tot_all if tot_all else 0.0, "device": str(dev),
           "nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
           "batch_size": forward_batch_size(config.batch_size, *calib_ids.shape),
           "low_memory": {"activation_dtype": str(act_dtype).replace("torch.", ""),
                          "compute_dtype": str(om.dtype).replace("torch.", ""), "capture_time_s": t_capture,
                          "model_mb": om.size_bytes() / 2 ** 20,
                          "max_block_mb": max(sum(om.ckpt.nbytes(om.keys[k], om.dtype) for k in ks)
                                              for ks in om.block_keys) / 2 ** 20,
                          "activations_mb": (int(calib_ids.numel()) * hidden_size(om) * act_dtype.itemsize) / 2 ** 20,
                          "prunable_weights": tot, "nonzero_before": nz_before, "nonzero_after": nz_after}}
    if dev.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return res

"""Models larger than memory: prune one decoder block at a time, straight from the safetensors shards.
``optprune prune --low-memory`` / ``prune(..., low_memory=True)``.

How it works:

1. **Skeleton.** The model is built from its ``config.json`` with ``accelerate.init_empty_weights`` (parameters
   on the ``meta`` device, buffers such as rotary tables real). The checkpoint's tensors are indexed by name
   (``model.safetensors`` or ``model.safetensors.index.json``) and read **one tensor at a time** with
   ``safetensors.safe_open`` (each file is opened per block and closed again, so no mapping stays resident).
2. **Capture.** The non-block tensors needed before block 0 (embeddings, positional tables, norms; never the
   output head) are materialised, block 0's hidden states and every block's own arguments (its mask, its
   positional table) are captured exactly as the in-memory pipeline captures them
   (:func:`~.pipeline.capture_block_inputs`, the blocks standing aside), and those tensors are released.
3. **One block at a time.** For each block up to the last one to prune: materialise it, prune it with any
   unstructured/N:M method through the ordinary pipeline (:func:`~.pipeline.prune_model` on a one-block view
   whose forward replays the stored block inputs), write its tensors to its own output shard, then compute the
   next block's inputs *in place* (``mode="dense-input"``: from the dense block, re-read from the checkpoint;
   ``"sequential"``: from the pruned block) and release it (back to ``meta``).
4. **Output.** ``model-XXXXX-of-YYYYY.safetensors`` shards (the non-block tensors first, packed up to
   ``SHARD_BYTES``; then one shard per block) + ``model.safetensors.index.json`` + ``config.json`` (+ generation
   config, tokenizer, ``run.json``): a directory stock ``AutoModelForCausalLM.from_pretrained`` loads.

Resident memory: one block (plus the pipeline's dense copy with error correction), the block inputs of the
calibration set twice — our buffer (``activation_dtype``: the model's dtype by default, or float16/bfloat16)
and the pipeline's captured copy in the compute dtype — and the Gram matrices of one group of sub-layers
(float32). The model is computed in ``dtype`` (float32 by default, like ``load_model``); with the default
activation dtype the pruned weights are **bit-for-bit those of the in-memory dense-input/sequential run**.

With ``--nproc N`` (or torchrun) the blocks are split between ranks as in :mod:`.distributed`: each rank streams
the blocks up to its last one, writes its own block shards into the output directory (which must be visible to
every rank: one machine, or a shared filesystem), and rank 0 writes the rest and the record.

Not supported here (clear errors): structured methods (their widths change the config), per-layer
allocations ``alpha``/``owl`` (they read every weight first), ``--calibration self`` (it samples from the whole
model), ``--reference``. Perplexity is computed block by block from the written shards (:func:`perplexity_offloaded`),
so the whole model is never resident in evaluation either.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
import types
from pathlib import Path
from typing import Optional

import torch
from torch import nn

__all__ = ["OffloadError", "Checkpoint", "OffloadedModel", "prune_offloaded", "prune_low_memory",
           "perplexity_offloaded", "SHARD_BYTES", "INDEX_FILE"]

#: the non-block tensors are packed into shards of at most this many bytes (a larger tensor gets its own)
SHARD_BYTES = 2 << 30
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class OffloadError(ValueError):
    """Bad input to the low-memory path (one line; nothing written)."""


def parse_dtype(v, what="--activation-dtype") -> Optional[torch.dtype]:
    if v is None or isinstance(v, torch.dtype):
        return v
    key = str(v).strip().lower().replace("torch.", "")
    if key not in _DTYPES:
        raise OffloadError(f"{what} must be float32, float16 or bfloat16, got {v!r}")
    return _DTYPES[key]


# ============================================================================================ the checkpoint
class Checkpoint:
    """The tensors of a safetensors checkpoint directory, by name; read one at a time."""

    def __init__(self, directory):
        self.dir = Path(directory)
        idx = self.dir / INDEX_FILE
        single = self.dir / "model.safetensors"
        if idx.is_file():
            wm = json.loads(idx.read_text())["weight_map"]
            self.file_of = {k: self.dir / f for k, f in wm.items()}
        elif single.is_file():
            self.file_of = None
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise OffloadError(f"--low-memory reads safetensors checkpoints; {self.dir.resolve()} has no "
                                   f"model.safetensors, {INDEX_FILE} or *.safetensors file")
            self.file_of = None
            single = None
        from safetensors import safe_open
        self.meta = {}  # name -> (shape, dtype string)
        files = sorted(set(self.file_of.values())) if self.file_of else ([single] if single else shards)
        fo = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    self.meta[k] = (tuple(sl.get_shape()), sl.get_dtype())
                    fo[k] = f
        self.file_of = fo

    def __contains__(self, key) -> bool:
        return key in self.file_of

    def nbytes(self, key, dtype: Optional[torch.dtype] = None) -> int:
        shape, dt = self.meta[key]
        size = dtype.itemsize if dtype is not None else _st_itemsize(dt)
        return math.prod(shape) * size

    def read(self, keys) -> dict:
        """{key: tensor} for ``keys``, each file opened once and closed again."""
        from safetensors import safe_open
        by_file = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for k in ks:
                    out[k] = h.get_tensor(k)
        return out


def _st_itemsize(dt: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1}.get(dt, 4)


_LIBC = None


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``): without it the allocator keeps the last
    block's pages and the resident set creeps up between blocks. A no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


# ============================================================================================ the skeleton
class OffloadedModel:
    """A model skeleton on the meta device plus its checkpoint; blocks materialised one at a time."""

    def __init__(self, directory, dtype: torch.dtype = torch.float32):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .architectures import get_arch, get_module
        self.dir = Path(directory)
        self.config = AutoConfig.from_pretrained(str(self.dir))
        self.dtype = dtype
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        self.arch = get_arch(self.model)  # an unsupported model is refused before the checkpoint is opened
        self.ckpt = Checkpoint(self.dir)
        self.blocks = get_module(self.model, self.arch.blocks)
        self.n_blocks = len(self.blocks)
        self.prefix = self.arch.blocks
        self._prefix_alt = getattr(self.model, "base_model_prefix", "") or ""
        sd = self.model.state_dict(keep_vars=True)
        out_emb = self.model.get_output_embeddings()
        self._out_key = None
        if out_emb is not None:
            for k, v in sd.items():
                if v is getattr(out_emb, "weight", None):
                    self._out_key = k
        # model key -> checkpoint key, for every tensor of the model (tied duplicates dropped)
        seen, self.keys = set(), {}
        param_ids = {id(p) for p in self.model.parameters()}
        for k, v in sd.items():
            if id(v) in seen:
                continue
            seen.add(id(v))
            ck = self._ckpt_key(k)
            if ck is None:
                if k == self._out_key and getattr(self.config, "tie_word_embeddings", False):
                    continue  # tied to the input embeddings: stock loading re-ties it
                if id(v) not in param_ids:
                    continue  # a persistent buffer the checkpoint does not carry: rebuilt at load time
                raise OffloadError(f"tensor {k!r} of the model is not in the checkpoint {self.dir.resolve()}")
            self.keys[k] = ck
        self.block_keys = [[k for k in self.keys if k.startswith(f"{self.prefix}.{i}.")]
                           for i in range(self.n_blocks)]
        in_blocks = {k for ks in self.block_keys for k in ks}
        self.rest_keys = [k for k in self.keys if k not in in_blocks]

    def _ckpt_key(self, k: str) -> Optional[str]:
        if k in self.ckpt:
            return k
        p = self._prefix_alt + "."
        if p != "." and k.startswith(p) and k[len(p):] in self.ckpt:
            return k[len(p):]
        if p != "." and p + k in self.ckpt:
            return p + k
        return None

    def n_params(self) -> int:
        return sum(math.prod(self.ckpt.meta[c][0]) for c in self.keys.values())

    def size_bytes(self) -> int:
        return sum(math.prod(self.ckpt.meta[c][0]) * self.dtype.itemsize for c in self.keys.values())

    # ------------------------------------------------------------------ materialise / release
    def _load_into(self, module: nn.Module, prefix: str, keys) -> None:
        raw = self.ckpt.read([self.keys[k] for k in keys])
        sd = {}
        for k in keys:
            t = raw[self.keys[k]]
            sd[k[len(prefix):]] = t.to(self.dtype) if t.is_floating_point() else t
        _, unexpected = module.load_state_dict(sd, strict=False, assign=True)
        loaded = module.state_dict(keep_vars=True)
        still_meta = [k for k in sd if loaded[k].is_meta]
        if unexpected or still_meta:
            raise OffloadError(f"loading {prefix or 'the model'} from {self.dir}: unexpected {unexpected[:3]}, "
                               f"not loaded {still_meta[:3]}")

    def block(self, i: int) -> nn.Module:
        """Block ``i`` with its tensors read from the checkpoint (in ``dtype``, on the CPU)."""
        b = self.blocks[i]
        self._load_into(b, f"{self.prefix}.{i}.", self.block_keys[i])
        return b

    def release(self, i: int) -> None:
        self.blocks[i] = self.blocks[i].to("meta")
        _trim()

    def block_tensors(self, i: int, block: nn.Module) -> dict:
        """The output tensors of block ``i`` (model key → contiguous CPU tensor)."""
        sd = block.state_dict()
        p = f"{self.prefix}.{i}."
        return {p + k: v.detach().to("cpu").contiguous() for k, v in sd.items() if p + k in self.keys}

    # ------------------------------------------------------------------ capture of the block inputs
    @torch.no_grad()
    def capture(self, calib_ids, *, device, batch_size=None):
        """Block 0's hidden states and every block's own arguments (:class:`~.pipeline.BlockInputs`), from the
        model's own forward with the (meta) blocks standing aside, as in the in-memory pipeline."""
        from .pipeline import capture_block_inputs
        pre = [k for k in self.rest_keys if k != self._out_key]
        out_emb = self.model.get_output_embeddings()
        # the non-block tensors before the blocks (embeddings, positions, norms) — never the output head
        self._load_into(self.model, "", pre)
        try:
            if out_emb is not None:
                self.model.set_output_embeddings(nn.Identity())
            return capture_block_inputs(self.model, calib_ids, device=device, batch_size=batch_size, arch=self.arch)
        finally:
            if out_emb is not None:
                self.model.set_output_embeddings(out_emb)
            self._release_rest()

    def _release_rest(self) -> None:
        """Every materialised non-block parameter back to ``meta`` (frees the embeddings after the capture)."""
        inside = {id(m) for b in self.blocks for m in b.modules()}
        for mod in self.model.modules():
            if id(mod) in inside:
                continue
            for name, p in list(mod.named_parameters(recurse=False)):
                if not p.is_meta:
                    setattr(mod, name, nn.Parameter(p.to("meta"), requires_grad=p.requires_grad))

    # ------------------------------------------------------------------ output pieces
    def rest_shards(self) -> list:
        """The non-block model keys packed into shards of ≤ SHARD_BYTES (deterministic)."""
        shards, cur, size = [], [], 0
        for k in self.rest_keys:
            n = self.ckpt.nbytes(self.keys[k], self.dtype)
            if cur and size + n > SHARD_BYTES:
                shards.append(cur)
                cur, size = [], 0
            cur.append(k)
            size += n
        if cur:
            shards.append(cur)
        return shards

    def shard_names(self) -> tuple:
        """(names of the rest shards, names of the block shards)."""
        r = len(self.rest_shards())
        total = r + self.n_blocks
        names = [f"model-{j + 1:05d}-of-{total:05d}.safetensors" for j in range(total)]
        return names[:r], names[r:]


def _save_shard(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


# ============================================================================================ one-block view
class _BlockView(nn.Module):
    """A causal-LM look-alike holding one block: its forward replays stored block inputs batch by batch, so that
    ``prune_model(view, ids, config)`` captures exactly those inputs (and prunes exactly that block)."""

    def __init__(self, config, arch, block, feed, vocab):
        super().__init__()
        self.config = config
        parts = arch.blocks.split(".")
        parent = self
        for p in parts[:-1]:
            child = nn.Module()
            parent.add_module(p, child)
            parent = child
        parent.add_module(parts[-1], nn.ModuleList([block]))
        object.__setattr__(self, "_path", arch.blocks)
        object.__setattr__(self, "optprune_arch", arch)  # get_arch: the full model's, not re-inferred
        object.__setattr__(self, "_feed", feed)   # (hidden on CPU, batches, compute dtype)
        object.__setattr__(self, "_emb", types.SimpleNamespace(num_embeddings=vocab))
        object.__setattr__(self, "_k", 0)
        self.eval()  # prune_model restores the view's mode: a training-mode view would leave dropout on

    def get_input_embeddings(self):
        return self._emb

    def forward(self, input_ids, **_):
        from .architectures import get_module
        hidden, batches, dtype = self._feed  # batches: this block's own (slice, args, kwargs)
        sl, args, kw = batches[self._k % len(batches)]
        object.__setattr__(self, "_k", self._k + 1)
        if input_ids.shape[0] != sl.stop - sl.start:
            raise RuntimeError("low-memory replay: calibration batches out of step with the stored block inputs")
        blk = get_module(self, self._path)[0]
        dev = input_ids.device
        return blk(hidden[sl].to(dev, dtype), *args, **kw)


def _rename(rec: dict, prefix: str, i: int) -> dict:
    r = dict(rec)
    r["block"] = i
    if "name" in r and r["name"].startswith(f"{prefix}.0."):
        r["name"] = f"{prefix}.{i}." + r["name"][len(prefix) + 3:]
    return r


@torch.no_grad()
def _forward_inplace(block, hidden, batches, dtype, dev) -> None:
    """hidden ← block(hidden), batch by batch (each batch depends on its own rows only)."""
    from .pipeline import _call_block
    block.to(dev)
    try:
        for sl, args, kw in batches:
            y = _call_block(block, hidden[sl].to(dev, dtype), args, kw)
            hidden[sl] = y.to("cpu", hidden.dtype)
    finally:
        block.to("cpu")


# ============================================================================================ pruning
@torch.no_grad()
def prune_offloaded(om: OffloadedModel, calib_ids, config, out_dir, *, blocks: Optional[list] = None,
                    activation_dtype: Optional[torch.dtype] = None, progress: bool = True,
                    write_rest: bool = True) -> dict:
    """Prune the blocks ``blocks`` (default: ``config.blocks`` or all) of the checkpoint ``om`` one at a time and
    write their shards to ``out_dir``; with ``write_rest`` also the non-block shards, the unselected blocks,
    the index and the config. Returns the pipeline-style record (``layers``, ``blocks``, ...)."""
    from tqdm.auto import tqdm

    from .pipeline import PipelineError, _batch_size, prune_model, validate_config
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    plan = validate_config(om.model, config, calib_ids)
    if plan.spec.structured:
        raise OffloadError(f"--low-memory prunes unstructured/N:M methods; {plan.spec.name!r} is structured "
                           f"(it changes widths): use the in-memory path")
    mine = sorted(plan.blocks if blocks is None else blocks)
    dev = plan.device
    act_dtype = activation_dtype or om.dtype
    rest_names, block_names = om.shard_names()
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
            _forward_inplace(blk, hidden, per_block[i], om.dtype, dev)
            om.release(i)
            continue
        subs = [f"{om.prefix}.{i}.{s}" for s in plan.arch.sublayer_names()]
        before = {}
        from .architectures import get_module, linear_weight
        for s in plan.arch.sublayer_names():
            W = linear_weight(get_module(blk, s), s in plan.arch.transposed)
            nz_before += int((W != 0).sum())
            tot += W.numel()
        ls = None
        if config.layer_sparsity:
            ls = {f"{om.prefix}.0.{n[len(om.prefix) + len(str(i)) + 2:]}": v
                  for n, v in config.layer_sparsity.items() if n in subs}
        view = _BlockView(om.config, plan.arch, blk, (hidden, per_block[i], om.dtype), vocab)
        cfg = dataclasses.replace(config, blocks=[0], layer_sparsity=ls or None)
        try:
            res = prune_model(view, calib_ids, cfg, progress=False)
        except PipelineError as e:
            raise PipelineError(f"block {i}: {e}") from None
        layers_rec += [_rename(r, om.prefix, i) for r in res["layers"]]
        for r in res["blocks"]:
            blocks_rec.append(_rename(r, om.prefix, i))
        for s in plan.arch.sublayer_names():
            nz_after += int((linear_weight(get_module(blk, s), s in plan.arch.transposed) != 0).sum())
        tw = time.perf_counter()
        _save_shard(om.block_tensors(i, blk), out_dir / block_names[i])
        t_write = time.perf_counter() - tw
        tf = time.perf_counter()
        if i != last:
            if config.mode == "dense-input":  # the next inputs come from the dense block: read it again
                om.release(i)
                blk = om.block(i)
            _forward_inplace(blk, hidden, per_block[i], om.dtype, dev)
        om.release(i)
        blocks_rec[-1].update(write_time_s=t_write, next_inputs_time_s=time.perf_counter() - tf,
                              total_time_s=time.perf_counter() - tb)
    bar.close()
    if write_rest:
        write_rest_and_index(om, out_dir, skip=set(mine))
    tot_all = sum(math.prod(r["shape"]) for r in layers_rec)
    zeros = sum(r["sparsity"] * math.prod(r["shape"]) for r in layers_rec)
    res = {"layers": layers_rec, "blocks": blocks_rec, "time_s": time.perf_counter() - t_start,
           "peak_rss_mb": _peak_rss_mb(), "sparsity": zeros / tot_all if tot_all else 0.0, "device": str(dev),
           "nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
           "batch_size": _batch_size(config.batch_size, *calib_ids.shape),
           "low_memory": {"activation_dtype": str(act_dtype).replace("torch.", ""),
                          "compute_dtype": str(om.dtype).replace("torch.", ""), "capture_time_s": t_capture,
                          "model_mb": om.size_bytes() / 2 ** 20,
                          "max_block_mb": max(sum(om.ckpt.nbytes(om.keys[k], om.dtype) for k in ks)
                                              for ks in om.block_keys) / 2 ** 20,
                          "activations_mb": (int(calib_ids.numel()) * _hidden(om) * act_dtype.itemsize) / 2 ** 20,
                          "prunable_weights": tot, "nonzero_before": nz_before, "nonzero_after": nz_after}}
    if dev.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return res


def _hidden(om) -> int:
    c = om.config
    return int(getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or getattr(c, "d_model", 0))


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_rest_and_index(om: OffloadedModel, out_dir, *, skip=frozenset()) -> dict:
    """Write the non-block shards and the blocks not in ``skip`` (unpruned, copied tensor by tensor from the
    checkpoint in the compute dtype), then the index and the config. Returns the index."""
    out_dir = Path(out_dir)
    rest_names, block_names = om.shard_names()
    for name, keys in zip(rest_names, om.rest_shards()):
        raw = om.ckpt.read([om.keys[k] for k in keys])
        _save_shard({k: _cast(raw[om.keys[k]], om.dtype) for k in keys}, out_dir / name)
        del raw
    for i in range(om.n_blocks):
        if i in skip:
            continue
        raw = om.ckpt.read([om.keys[k] for k in om.block_keys[i]])
        _save_shard({k: _cast(raw[om.keys[k]], om.dtype) for k in om.block_keys[i]}, out_dir / block_names[i])
        del raw
    wm = {}
    for name, keys in zip(rest_names, om.rest_shards()):
        wm.update({k: name for k in keys})
    for i, keys in enumerate(om.block_keys):
        wm.update({k: block_names[i] for k in keys})
    missing = [n for n in set(wm.values()) if not (out_dir / n).is_file()]
    if missing:
        raise RuntimeError(f"low-memory output incomplete: shard(s) {sorted(missing)[:3]} missing in {out_dir}")
    total = sum(om.ckpt.nbytes(om.keys[k], om.dtype) for k in wm)
    index = {"metadata": {"total_size": total, "format": "optprune-low-memory"}, "weight_map": dict(sorted(wm.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1))
    cfg = copy.deepcopy(om.config)
    try:
        cfg.dtype = om.dtype
    except Exception:  # pragma: no cover - older configs
        cfg.torch_dtype = om.dtype
    cfg.save_pretrained(str(out_dir))
    gen = om.dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out_dir / "generation_config.json")
    return index


def _cast(t, dtype):
    return (t.to(dtype) if t.is_floating_point() else t).contiguous()


# ============================================================================================ perplexity
@torch.no_grad()
def perplexity_offloaded(directory, ids: torch.Tensor, seqlen: int, *, max_windows: Optional[int] = None,
                         device=None, dtype=torch.float32, batch_size: Optional[int] = None,
                         progress: bool = True, desc: str = "perplexity") -> dict:
    """Perplexity as :func:`~.evaluation.perplexity` computes it (non-overlapping windows, mean token NLL), but
    streaming the model block by block from ``directory``'s shards: resident are one block and the hidden states
    of the evaluated windows (``windows × seqlen × hidden`` in ``dtype``), and the output head per batch."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .architectures import get_module
    from .evaluation import window_count
    t0 = time.perf_counter()
    om = OffloadedModel(directory, dtype=dtype)
    ids = torch.as_tensor(ids).reshape(-1).to(torch.long)
    n = window_count(ids.numel(), seqlen, max_windows)
    if n < 1:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    X = ids[: n * seqlen].view(n, seqlen)
    dev = torch.device(device or "cpu")
    inp = om.capture(X, device=dev, batch_size=batch_size)
    hidden = inp.hidden.to("cpu")
    per_block, batches = inp.per_block, inp.batches
    del inp
    for i in tqdm(range(om.n_blocks), desc=desc, unit="block", leave=False, disable=not progress):
        _forward_inplace(om.block(i), hidden, per_block[i], om.dtype, dev)
        om.release(i)
    # the final norm and the output head (tied: the input embedding's weight)
    head_keys = [k for k in om.rest_keys]
    om._load_into(om.model, "", head_keys)
    out = om.model.get_output_embeddings()
    if out is not None and out.weight.is_meta:  # tied to the input embeddings
        out.weight = om.model.get_input_embeddings().weight
    norm = get_module(om.model, om.arch.final_norm).to(dev)
    out.to(dev)
    total, count = 0.0, 0
    for sl, _, _ in batches:
        h = norm(hidden[sl].to(dev, om.dtype))
        logits = out(h)[:, :-1, :].float()
        x = X[sl].to(dev)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x.shape[0] * (seqlen - 1)
    mean = total / count
    ppl = math.exp(mean) if math.isfinite(mean) and mean < 700 else float("nan" if not math.isfinite(mean) else "inf")
    return {"ppl": ppl, "nll": mean, "tokens": count, "windows": n, "seqlen": seqlen,
            "time_s": time.perf_counter() - t0, "streamed": True}


# ============================================================================================ run.prune's hook
def _resolve_source(model, model_dir) -> Path:
    """The safetensors directory of a model name: built-in, local directory, or a hub id (downloaded to the hub
    cache shard by shard by ``huggingface_hub``, never loaded)."""
    from .loading import _ALIASES, builtin_path
    name = str(model)
    key = _ALIASES.get(name.strip().lower())
    if key is not None:
        d, gguf = builtin_path(key, model_dir)
        if gguf:
            raise OffloadError(f"--low-memory reads safetensors shards; the built-in {key!r} is a GGUF file "
                               f"({d / gguf}): save it once as safetensors (load_model + save_pretrained) and pass "
                               f"that directory, or prune it without --low-memory (it is small)")
        return d
    p = Path(name).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        raise OffloadError(f"--low-memory reads safetensors shards, not GGUF ({p}); convert it to a safetensors "
                           f"directory first")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise OffloadError(f"--low-memory needs a Hugging Face directory with config.json; {p.resolve()} has none")
        return p
    if p.exists() or name.startswith((".", "/", "~")):
        raise OffloadError(f"no model directory at {p.resolve()}")
    try:  # a hub id: the shards go to the hub cache on disk (ordinary client), never into memory
        from huggingface_hub import snapshot_download
        pats = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        try:
            return Path(snapshot_download(name, allow_patterns=pats, local_files_only=True))
        except Exception:
            return Path(snapshot_download(name, allow_patterns=pats))
    except Exception as e:
        raise OffloadError(f"model {name!r}: not a built-in name or directory, and the hub download failed "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _clean_output(out_dir: Path) -> None:
    """Remove the weight files of a previous run in ``out_dir`` (an optprune output, checked by run.prune): a stale
    ``model.safetensors`` next to a new index would be loaded instead of it."""
    if out_dir.is_dir():
        for f in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model*.safetensors.part")) + \
                [out_dir / INDEX_FILE, out_dir / "pytorch_model.bin"]:
            if f.is_file():
                f.unlink()


def _spawned_offload_worker(directory, dtype, config, out_dir, act, assignment):
    """A spawned worker of the low-memory run: its own skeleton, its own blocks, its own shards."""
    from .distributed import distributed_context
    with distributed_context(1, device=config.device) as ctx:
        om, err = None, None
        try:
            om = OffloadedModel(directory, dtype=dtype)
        except Exception as e:
            err = e
        _offload_rank(ctx, om, None, config, out_dir, act, assignment, progress=False, _error=err)


def _offload_rank(ctx, om, calib_ids, config, out_dir, act, assignment, *, progress, _error=None):
    """Every rank: prune its blocks of the checkpoint and write their shards; rank 0 then writes the rest, the
    index and returns the merged record (others: None)."""
    from .distributed import (_broadcast_inputs, _check_mode, _device_for_rank, _merge, _tcp_addresses, _rss_mb,
                              assign_blocks, exchange)
    from .pipeline import validate_config
    import socket
    t0 = time.perf_counter()
    calib_ids, config = _broadcast_inputs(ctx, calib_ids, config)
    torch.distributed.barrier()  # rank 0 has cleaned the output directory before anyone writes a shard
    _check_mode(config)
    config = dataclasses.replace(config, device=_device_for_rank(config.device, ctx.local_rank, ctx.backend))
    err, res, mine, plan = _error, {}, [], None
    if err is None:
        try:
            plan = validate_config(om.model, config, calib_ids)
            owners = assign_blocks(plan.blocks, ctx.world, assignment)
            mine = owners[ctx.rank]
            res = prune_offloaded(om, calib_ids, config, out_dir, blocks=mine, activation_dtype=act,
                                  progress=progress and ctx.rank == 0, write_rest=False)
        except Exception as e:
            err = e
    summary = {"blocks_owned": mine, "host": socket.gethostname(), "threads": torch.get_num_threads(),
               "device": str(config.device), "tcp_addresses": _tcp_addresses(),
               **{k: res.get(k) for k in ("layers", "blocks", "time_s", "peak_cuda_mb", "low_memory")},
               "prune_time_s": time.perf_counter() - t0, "peak_rss_mb": _rss_mb(),
               "forward_blocks": min(mine) if mine else 0}
    proceed, gathered = exchange(ctx, summary, err)
    if not proceed or ctx.rank != 0:
        return None
    write_rest_and_index(om, out_dir, skip=set(plan.blocks))
    owners = assign_blocks(plan.blocks, ctx.world, assignment)
    merged = _merge(gathered, ctx, owners, assignment, calib_ids, config, time.perf_counter() - t0, 0.0, 0)
    lm = [g["low_memory"] for g in gathered if g.get("low_memory")]
    if lm:
        low = dict(lm[0])
        for k in ("prunable_weights", "nonzero_before", "nonzero_after"):
            low[k] = sum(x[k] for x in lm)
        low["capture_time_s"] = max(x["capture_time_s"] for x in lm)
        merged["low_memory"] = low
    for r in merged["distributed"]["ranks"]:
        r["shards_written_by_rank"] = True
    return merged


def prune_low_memory(*, model, model_dir, spec, sparsity, pattern, min_degree, allocation, structure, mode,
                     error_correction, refit, method_options, damp, batch_size, nproc, device, settings, output,
                     evaluate, data_dir, reference, seed, activation_dtype, progress, verbose, return_model,
                     t_total, assignment=None):
    """``run.prune(..., low_memory=True)``: everything after run.prune's input checks (see the module doc)."""
    from . import data as D
    from . import run as R
    from .distributed import _check_mode, distributed_context, world_for
    from .pipeline import PruneConfig, validate_config
    s = settings
    if output is None:
        raise OffloadError("--low-memory writes the pruned model shard by shard: give --output DIR")
    if spec.structured:
        raise OffloadError(f"--low-memory prunes unstructured/N:M methods; {spec.name!r} is structured (it changes "
                           f"widths): use the in-memory path")
    if allocation != "uniform":
        raise OffloadError(f"--allocation {allocation} reads every weight matrix first; it is not available with "
                           f"--low-memory (use --allocation uniform)")
    if s["calibration"] == "self":
        raise OffloadError("--calibration self samples from the whole model; with --low-memory give a calibration "
                           "text (--calibration c4|wikitext2|ptb|FILE, --data-dir DIR)")
    if reference:
        raise OffloadError("--reference is not available with --low-memory (it loads two whole models); run "
                           "optprune eval --model OUT --reference DENSE afterwards")
    if return_model:
        raise OffloadError("return_model is not available with low_memory (the model is never whole in memory); "
                           "load the output directory instead")
    act = parse_dtype(activation_dtype)
    out_dir = Path(output)
    timings = {}
    t0 = time.perf_counter()
    directory = _resolve_source(model, model_dir)
    om = OffloadedModel(directory)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(directory))
    timings["load_s"] = time.perf_counter() - t0
    R._clip_to_context(s, om.model)
    cfg_kw = dict(method=spec.name, sparsity=sparsity, pattern=pattern, min_degree=min_degree, structure=structure,
                  mode=mode, error_correction=bool(error_correction), refit=bool(refit),
                  method_options=method_options, device=device)
    if damp is not None:
        cfg_kw["damp"] = float(damp)
    if batch_size is not None:
        cfg_kw["batch_size"] = int(batch_size)
    config = PruneConfig(**cfg_kw)
    validate_config(om.model, config)
    world = world_for(nproc)
    if world > 1:
        _check_mode(config)
    c = om.config
    meta = {"name": str(model), "source": str(Path(directory).resolve()), "format": "safetensors (low-memory)",
            "model_type": getattr(c, "model_type", None), "architecture": (getattr(c, "architectures", None) or
                                                                           [type(om.model).__name__])[0],
            "n_params": om.n_params(), "dtype": str(om.dtype).replace("torch.", ""),
            "num_layers": om.n_blocks, "hidden_size": _hidden(om),
            "max_position_embeddings": getattr(c, "max_position_embeddings", getattr(c, "n_positions", None)),
            "vocab_size": getattr(c, "vocab_size", None)}
    record = {"command": "prune", "status": "running",
              "config": R._jsonable({"model": str(model), "method": spec.name, "sparsity": sparsity,
                                     "pattern": pattern, "min_degree": min_degree, "allocation": allocation,
                                     "allocation_eps": None, "structure": None, "mode": mode,
                                     "error_correction": bool(error_correction), "refit": bool(refit),
                                     "method_options": method_options, "damp": config.damp, "nproc": nproc,
                                     "world_size": world, "device": device, "seed": s["seed"],
                                     "output": str(out_dir), "evaluate": bool(evaluate), "low_memory": True,
                                     "activation_dtype": str(act or om.dtype).replace("torch.", ""),
                                     "data_dir": str(D.resolve_data_dir(data_dir)), "reference": None}),
              "versions": R._versions(), "machine": R._machine(device), "model": meta}
    t0 = time.perf_counter()
    calib, calib_info = D.calibration_tokens(tok, s["calibration"], nsamples=s["nsamples"], seqlen=s["seqlen"],
                                             seed=s["seed"], data_dir=data_dir, return_info=True)
    timings["calibration_s"] = time.perf_counter() - t0
    record["calibration"] = R._jsonable(calib_info)
    from .distributed import env_world
    if env_world() is None or env_world()[0] == 0:  # (torchrun: rank 0 only; the others wait at a barrier)
        _clean_output(out_dir)
    if world > 1:
        with distributed_context(world, _spawned_offload_worker,
                                 (str(directory), om.dtype, config, str(out_dir), act, assignment),
                                 device=device) as ctx:
            res = _offload_rank(ctx, om, calib, config, out_dir, act, assignment, progress=progress)
        if res is None:
            return None
    else:
        res = prune_offloaded(om, calib, config, out_dir, activation_dtype=act, progress=progress)
    timings["prune_s"] = res.get("time_s")
    low = res.get("low_memory") or {}
    record["layers"] = R._jsonable(res.get("layers", []))
    record["blocks"] = R._jsonable(res.get("blocks", []))
    record["pipeline"] = R._jsonable({k: v for k, v in res.items() if k not in ("layers", "blocks")})
    rel = [r["rel_error"] for r in res.get("layers", []) if r.get("rel_error") is not None]
    targets = [(r["sparsity_target"], math.prod(r["shape"])) for r in res.get("layers", []) if "shape" in r]
    tot_w = low.get("prunable_weights", 0)
    record["summary"] = {
        "prunable_weights": tot_w, "nonzero_before": low.get("nonzero_before"),
        "nonzero_after": low.get("nonzero_after"),
        "sparsity": 1.0 - low.get("nonzero_after", 0) / tot_w if tot_w else 0.0,
        "sparsity_target": (sum(t * n for t, n in targets) / sum(n for _, n in targets)) if targets else None,
        "layers": len(res.get("layers", [])),
        "mean_rel_error": (sum(rel) / len(rel)) if rel else None, "max_rel_error": max(rel) if rel else None}
    t0 = time.perf_counter()
    tok.save_pretrained(str(out_dir))
    record["saved"] = {"path": str(out_dir.resolve()), "format": "hf (safetensors shards, written block by block)",
                       "stock_loadable": True}
    timings["save_s"] = time.perf_counter() - t0
    if evaluate and s["eval_datasets"]:
        t0 = time.perf_counter()
        ppl = {}
        for name in s["eval_datasets"]:
            ids = D.eval_tokens(tok, name, seqlen=s["eval_seqlen"], data_dir=data_dir)
            r = perplexity_offloaded(out_dir, ids, s["eval_seqlen"], max_windows=s["eval_windows"], device=device,
                                     dtype=om.dtype, progress=progress, desc=f"eval {name} (streamed)")
            r["dataset"] = name
            r["all_windows"] = s["eval_windows"] is None or r["windows"] < s["eval_windows"]
            ppl[name] = r
        record["perplexity"] = ppl
        timings["eval_s"] = time.perf_counter() - t0
    record["protocol"] = R._protocol_record(s)
    timings["total_s"] = time.perf_counter() - t_total
    record["timings"] = timings
    record["peak_rss_mb"] = _peak_rss_mb()
    if res.get("peak_cuda_mb") is not None:
        record["peak_cuda_mb"] = res["peak_cuda_mb"]
    record["status"] = "done"
    record = R._jsonable(record)
    (out_dir / R.RUN_FILE).write_text(json.dumps(record, indent=1))
    if verbose:
        R._print_prune_summary(record, out_dir)
        print(f"  low memory: largest block {low.get('max_block_mb', 0):.1f} MB of a {low.get('model_mb', 0):.1f} MB "
              f"model; activations {low.get('activations_mb', 0):.1f} MB ({low.get('activation_dtype')})")
    return record

"""Storage for models larger than memory: a safetensors checkpoint read one tensor at a time, a model skeleton
whose blocks are materialised one at a time, output shards written block by block, and perplexity streamed
from written shards. The prune flow over these pieces (``optprune prune --low-memory``) is the engine's
:class:`~optprune.llm_adapters.engine.ShardedSource`.

* :class:`Checkpoint` indexes the tensors of a checkpoint directory by name (``model.safetensors`` or
  ``model.safetensors.index.json``) and reads them with ``safetensors.safe_open``, each file opened per read
  and closed again, so no mapping stays resident.
* :class:`OffloadedModel` builds the model from its ``config.json`` with ``accelerate.init_empty_weights``
  (parameters on the ``meta`` device, buffers such as rotary tables real); :meth:`~OffloadedModel.block`
  materialises block ``i`` (in ``dtype``), :meth:`~OffloadedModel.release` sends it back to ``meta``, and
  :meth:`~OffloadedModel.capture` records block 0's hidden states and every block's own arguments (mask,
  positional table) from the model's own forward, the (meta) blocks standing aside
  (:func:`~.pipeline.capture_block_inputs`), with the non-block tensors before the blocks materialised only for
  that forward (never the output head).
* Output: ``model-XXXXX-of-YYYYY.safetensors`` shards (the non-block tensors first, packed up to
  ``SHARD_BYTES``; then one shard per block, :func:`save_shard`) + ``model.safetensors.index.json`` +
  ``config.json`` (+ generation config) — :func:`write_rest_and_index` — a directory stock
  ``AutoModelForCausalLM.from_pretrained`` loads.
* :func:`perplexity_offloaded`: perplexity as :func:`~.evaluation.perplexity` computes it, the model streamed
  block by block from the written shards, so the whole model is never resident in evaluation either.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

__all__ = ["OffloadError", "Checkpoint", "OffloadedModel", "write_rest_and_index", "perplexity_offloaded",
           "SHARD_BYTES", "INDEX_FILE",
           "save_shard", "forward_inplace", "hidden_size", "safetensors_dir", "remove_previous_weights", "parse_dtype"]

#: the non-block tensors are packed into shards of at most this many bytes (a larger tensor gets its own)
SHARD_BYTES = 2 << 30
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class OffloadError(ValueError):
    """Bad input to the low-memory path (one line; nothing written)."""


def parse_dtype(v, what="--activation-dtype") -> Optional[torch.dtype]:
    """The torch dtype a name gives (float32/float16/bfloat16, or fp32/fp16/bf16); ``None`` stays ``None``;
    any other name is an :class:`OffloadError` naming the valid ones."""
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
            ckpt_key = self._ckpt_key(k)
            if ckpt_key is None:
                if k == self._out_key and getattr(self.config, "tie_word_embeddings", False):
                    continue  # tied to the input embeddings: stock loading re-ties it
                if id(v) not in param_ids:
                    continue  # a persistent buffer the checkpoint does not carry: rebuilt at load time
                raise OffloadError(f"tensor {k!r} of the model is not in the checkpoint {self.dir.resolve()}")
            self.keys[k] = ckpt_key
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


def save_shard(tensors: dict, path: Path) -> None:
    """Write one safetensors shard atomically (a ``.part`` file renamed into place)."""
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


# ============================================================================================ streaming a block
@torch.no_grad()
def forward_inplace(block, hidden, batches, dtype, dev) -> None:
    """hidden ← block(hidden), batch by batch (each batch depends on its own rows only)."""
    from .pipeline import call_block
    block.to(dev)
    try:
        for sl, args, kw in batches:
            y = call_block(block, hidden[sl].to(dev, dtype), args, kw)
            hidden[sl] = y.to("cpu", hidden.dtype)
    finally:
        block.to("cpu")


def hidden_size(offloaded) -> int:
    """The residual-stream width of an offloaded model (from its config)."""
    c = offloaded.config
    return int(getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or getattr(c, "d_model", 0))


def write_rest_and_index(offloaded: OffloadedModel, out_dir, *, skip=frozenset()) -> dict:
    """Write the non-block shards and the blocks not in ``skip`` (unpruned, copied tensor by tensor from the
    checkpoint in the compute dtype), then the index and the config. Returns the index."""
    out_dir = Path(out_dir)
    rest_names, block_names = offloaded.shard_names()
    for name, keys in zip(rest_names, offloaded.rest_shards()):
        raw = offloaded.ckpt.read([offloaded.keys[k] for k in keys])
        save_shard({k: _cast(raw[offloaded.keys[k]], offloaded.dtype) for k in keys}, out_dir / name)
        del raw
    for i in range(offloaded.n_blocks):
        if i in skip:
            continue
        keys = offloaded.block_keys[i]
        raw = offloaded.ckpt.read([offloaded.keys[k] for k in keys])
        save_shard({k: _cast(raw[offloaded.keys[k]], offloaded.dtype) for k in keys}, out_dir / block_names[i])
        del raw
    weight_map = {}
    for name, keys in zip(rest_names, offloaded.rest_shards()):
        weight_map.update({k: name for k in keys})
    for i, keys in enumerate(offloaded.block_keys):
        weight_map.update({k: block_names[i] for k in keys})
    missing = [n for n in set(weight_map.values()) if not (out_dir / n).is_file()]
    if missing:
        raise RuntimeError(f"low-memory output incomplete: shard(s) {sorted(missing)[:3]} missing in {out_dir}")
    total = sum(offloaded.ckpt.nbytes(offloaded.keys[k], offloaded.dtype) for k in weight_map)
    index = {"metadata": {"total_size": total, "format": "optprune-low-memory"},
             "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1))
    cfg = copy.deepcopy(offloaded.config)
    try:
        cfg.dtype = offloaded.dtype
    except Exception:  # pragma: no cover - older configs
        cfg.torch_dtype = offloaded.dtype
    cfg.save_pretrained(str(out_dir))
    gen = offloaded.dir / "generation_config.json"
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
    offloaded = OffloadedModel(directory, dtype=dtype)
    ids = torch.as_tensor(ids).reshape(-1).to(torch.long)
    n = window_count(ids.numel(), seqlen, max_windows)
    if n < 1:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    X = ids[: n * seqlen].view(n, seqlen)
    dev = torch.device(device or "cpu")
    inp = offloaded.capture(X, device=dev, batch_size=batch_size)
    hidden = inp.hidden.to("cpu")
    per_block, batches = inp.per_block, inp.batches
    del inp
    for i in tqdm(range(offloaded.n_blocks), desc=desc, unit="block", leave=False, disable=not progress):
        forward_inplace(offloaded.block(i), hidden, per_block[i], offloaded.dtype, dev)
        offloaded.release(i)
    # the final norm and the output head (tied: the input embedding's weight)
    head_keys = [k for k in offloaded.rest_keys]
    offloaded._load_into(offloaded.model, "", head_keys)
    out = offloaded.model.get_output_embeddings()
    if out is not None and out.weight.is_meta:  # tied to the input embeddings
        out.weight = offloaded.model.get_input_embeddings().weight
    norm = get_module(offloaded.model, offloaded.arch.final_norm).to(dev)
    out.to(dev)
    total, count = 0.0, 0
    for sl, _, _ in batches:
        h = norm(hidden[sl].to(dev, offloaded.dtype))
        logits = out(h)[:, :-1, :].float()
        x = X[sl].to(dev)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x.shape[0] * (seqlen - 1)
    mean = total / count
    ppl = math.exp(mean) if math.isfinite(mean) and mean < 700 else float("nan" if not math.isfinite(mean) else "inf")
    return {"ppl": ppl, "nll": mean, "tokens": count, "windows": n, "seqlen": seqlen,
            "time_s": time.perf_counter() - t0, "streamed": True}


# ============================================================================================ sources and outputs
def safetensors_dir(model, model_dir) -> Path:
    """The safetensors directory of a model name: built-in, local directory, or a hub id (downloaded to the hub
    cache shard by shard by ``huggingface_hub``, never loaded)."""
    from .loading import MODEL_ALIASES, builtin_path
    name = str(model)
    key = MODEL_ALIASES.get(name.strip().lower())
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


def remove_previous_weights(out_dir: Path) -> None:
    """Remove the weight files of a previous run in ``out_dir`` (an optprune output, checked by run.prune): a stale
    ``model.safetensors`` next to a new index would be loaded instead of it."""
    if out_dir.is_dir():
        for f in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model*.safetensors.part")) + \
                [out_dir / INDEX_FILE, out_dir / "pytorch_model.bin"]:
            if f.is_file():
                f.unlink()

"""Self-generated calibration data: sample the calibration sequences from the dense model itself.

On a machine with nothing but PyPI there is no WikiText or C4; the model still knows what its own input
distribution looks like. :func:`self_calibration` draws ``nsamples`` sequences of ``seqlen`` tokens from the
dense model (temperature + nucleus sampling), starting from the model's document-start token (``"bos"``) or
from short generic prompts, batched, with a KV cache, and caches the result on disk so that a second run with
the same model and settings does not regenerate it.

Reproducibility
---------------
* Every sample ``i`` has its own ``torch.Generator`` seeded from ``(seed, i)`` and consumes exactly one
  uniform number per generated token (inverse-CDF sampling on the top-p set: float32 softmax on the CPU, the
  cumulative sums in float64).
  Same model + same settings + same seed ⇒ same tokens on the CPU, and the draw does not depend on
  ``batch_size`` or ``nsamples`` except through floating-point rounding of batched matrix products (which
  can, rarely, flip a token whose cumulative probability lies within ~1e-7 of the uniform draw).
* On CUDA the logits themselves are not bitwise reproducible across GPUs/library versions (and not across
  batch sizes), so GPU-generated sequences are a valid seeded sample but not guaranteed identical to the
  CPU's. The cache key does not include the device: a cached file made on one device is reused on another.
* The cache key is a hash of the model identity (config + dtype/shape + strided weight samples + non-zero
  count of every tensor, see :func:`model_fingerprint`), the prompt token ids, ``nsamples``, ``seqlen``,
  ``seed``, ``temperature``, ``top_p`` and ``suppress_eos``. A pruned model therefore never hits the dense
  model's cache entry.

The sampled EOS token(s) are suppressed by default (``suppress_eos=True``) so every sequence is ``seqlen``
tokens of running text; the document-start token may still be sampled mid-sequence (a new document begins,
as in packed pre-training data).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

__all__ = ["self_calibration", "heldout_sequences", "model_fingerprint", "default_cache_dir", "default_batch_size",
           "GENERIC_PROMPTS", "SelfCalibrationError", "start_token_id", "HELDOUT_SEED_OFFSET"]

#: short, domain-neutral openings used by ``prompts="generic"`` (cycled over the samples)
GENERIC_PROMPTS = (
    "The", "In", "Once upon a time", "It is", "A", "This", "We", "When", "There are", "Today",
    "One of the", "I", "According to", "How to", "If you", "The following",
)

#: the held-out evaluation sequences use ``seed + HELDOUT_SEED_OFFSET`` (distinct from calibration)
HELDOUT_SEED_OFFSET = 1000

_FORMAT_VERSION = 2

#: below this many parameters, CPU generation defaults to one torch thread (see ``num_threads``)
SMALL_MODEL_PARAMS = 20_000_000
#: default batching: at most this many sequences at once, KV cache at most this many bytes
MAX_BATCH = 64
KV_BUDGET = 2 * 2 ** 30
#: head sizes tried in turn by the nucleus sampler before sorting a whole row
_TOPK_STEPS = (256, 4096)


class SelfCalibrationError(ValueError):
    """Bad arguments to :func:`self_calibration` (one line, nothing generated)."""


def default_cache_dir() -> Path:
    from .data import optprune_home
    return optprune_home()


# ------------------------------------------------------------------------------------------- identity
@torch.no_grad()
def model_fingerprint(model, samples_per_tensor: int = 256) -> str:
    """A short hash of the model's identity: its config, and for every tensor of the state dict its name,
    dtype, shape, number of non-zeros and a strided sample of its values (exact bytes).

    Cheap (one pass counting non-zeros) and sensitive to pruning anywhere in the network."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        d = {k: v for k, v in d.items() if not k.startswith("_") and k not in ("transformers_version",)}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        if not torch.is_tensor(t):
            continue
        flat = t.detach().reshape(-1)
        n = flat.numel()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{int(torch.count_nonzero(flat)) if n else 0}".encode())
        if n:
            step = max(1, n // samples_per_tensor)
            h.update(flat[::step][:samples_per_tensor].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:20]


# ------------------------------------------------------------------------------------------- prompts
def start_token_id(tokenizer, model=None) -> int:
    """The token a document starts with: the special token the tokenizer prepends to text (LLaMA's ``<s>``);
    else the ``<|endoftext|>`` document separator of GPT-2-style vocabularies; else BOS; else EOS."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        if ids and ids[0] in special:
            return int(ids[0])
    except Exception:  # pragma: no cover - exotic tokenizers
        pass
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for src in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        for attr in ("bos_token_id", "eos_token_id"):
            v = getattr(src, attr, None) if src is not None else None
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
    raise SelfCalibrationError("self-calibration: the tokenizer has no BOS/EOS/<|endoftext|> token to start from;"
                               " pass prompts=[...] instead")


def _prompt_ids(tokenizer, model, prompts) -> list[list[int]]:
    start = start_token_id(tokenizer, model)
    if isinstance(prompts, str):
        if prompts == "bos":
            return [[start]]
        if prompts == "generic":
            prompts = list(GENERIC_PROMPTS)
        else:
            raise SelfCalibrationError(f"self-calibration: prompts must be 'bos', 'generic' or a list of strings,"
                                       f" got {prompts!r}")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise SelfCalibrationError("self-calibration: prompts must be a non-empty list of strings")
    out = []
    for p in prompts:
        ids = list(tokenizer(p, add_special_tokens=False)["input_ids"]) if p else []
        out.append([start] + [int(i) for i in ids])
    return out


def _eos_ids(tokenizer, model, start: int) -> list[int]:
    ids = set()
    for src in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    ids.discard(start)  # GPT-2: eos == <|endoftext|> == the document start: a new document is fine
    return sorted(ids)


# ------------------------------------------------------------------------------------------- sampling
def _sample_rows(logits: torch.Tensor, temperature: float, top_p: float, gens: list) -> torch.Tensor:
    """One token per row by inverse-CDF sampling from the top-p set; one uniform from each row's generator.

    The probabilities are a float32 softmax; only the head of each row is sorted (``topk`` of
    :data:`_TOPK_STEPS` sizes in turn, the full row only when the nucleus is wider), and the inverse CDF over
    the kept head is taken in float64. A full float64 sort of a 49k vocabulary for 64 rows took ~0.5 s per
    decoding step, more than the model's forward pass."""
    logits = logits.to("cpu", torch.float32)
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    B, V = probs.shape
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
    out = torch.empty(B, dtype=torch.long)
    todo = torch.arange(B)
    for k in _TOPK_STEPS + (V,):
        k = min(int(k), V)
        sp, si = torch.topk(probs[todo], k, dim=-1, sorted=True) if k < V else \
            probs[todo].sort(dim=-1, descending=True, stable=True)
        sp = sp.to(torch.float64)
        cum = sp.cumsum(-1)
        done = (cum[:, -1] >= top_p) | (k == V)   # the nucleus ends inside this head
        if bool(done.any()):
            sp, si, cum, rows = sp[done], si[done], cum[done], todo[done]
            keep = (cum - sp) < top_p          # the smallest prefix whose mass reaches top_p (always ≥ 1 token)
            sp = sp * keep
            cdf = sp.cumsum(-1)
            uu = u[rows] * cdf[:, -1]
            idx = torch.searchsorted(cdf, uu.unsqueeze(1)).clamp_max(cdf.shape[1] - 1)
            idx = torch.minimum(idx, keep.sum(-1, keepdim=True) - 1)   # never step past the kept set
            out[rows] = si.gather(1, idx).squeeze(1)
        todo = todo[~done]
        if todo.numel() == 0:
            break
    return out


def _kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token occupies (all layers), from the config; a generous guess when unknown."""
    cfg = getattr(model, "config", None)
    g = lambda *names, default=None: next((getattr(cfg, n) for n in names if getattr(cfg, n, None)), default)
    layers = int(g("num_hidden_layers", "n_layer", "num_layers", default=32))
    heads = int(g("num_attention_heads", "n_head", default=1))
    hidden = int(g("hidden_size", "n_embd", "d_model", default=4096))
    kv_heads = int(g("num_key_value_heads", default=heads))
    head_dim = int(g("head_dim", default=max(1, hidden // max(1, heads))))
    itemsize = next(model.parameters()).element_size()
    return layers * 2 * kv_heads * head_dim * itemsize


def default_batch_size(model, nsamples: int, seqlen: int) -> int:
    """Sequences decoded together: up to :data:`MAX_BATCH`, with the KV cache under :data:`KV_BUDGET` bytes.
    Larger batches amortise the weight reads: SmolLM2-135M on one CPU core generated 44 / 70 / 87 tokens per
    CPU-second at batch 8 / 32 / 64."""
    fit = KV_BUDGET // max(1, _kv_bytes_per_token(model) * int(seqlen))
    return int(max(1, min(MAX_BATCH, int(nsamples), fit)))


def _forward_params(model) -> set:
    import inspect
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return set()


@torch.inference_mode()
def _generate_batch(model, prompt: list[int], rows: list[int], seqlen: int, seed: int, temperature: float,
                    top_p: float, banned: list[int], bar) -> torch.Tensor:
    device = next(model.parameters()).device
    gens = []
    for i in rows:
        g = torch.Generator(device="cpu")
        g.manual_seed((int(seed) * 1_000_003 + int(i) * 7919 + 12345) % (2 ** 63))
        gens.append(g)
    B = len(rows)
    seq = torch.tensor([prompt] * B, dtype=torch.long)
    params = _forward_params(model)
    kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    # transformers ≥ 5 names the KV cache ``cache`` (``past_key_values`` is deprecated there)
    cache_kw = "cache" if "cache" in params else "past_key_values"
    x = seq.to(device)
    past = None
    while seq.shape[1] < seqlen:
        out = model(input_ids=x, use_cache=True, **{cache_kw: past}, **kw)
        past = out.cache if cache_kw == "cache" else out.past_key_values
        logits = out.logits[:, -1, :]
        if banned:
            logits = logits.clone()
            logits[:, banned] = float("-inf")
        nxt = _sample_rows(logits, temperature, top_p, gens)
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        x = nxt.unsqueeze(1).to(device)
        if bar is not None:
            bar.update(B)
    return seq[:, :seqlen]


def self_calibration(model, tokenizer, nsamples: int = 128, seqlen: int = 512, *, seed: int = 0,
                     temperature: float = 1.0, top_p: float = 0.95,
                     prompts: Union[str, Sequence[str]] = "bos", batch_size: Optional[int] = None,
                     cache_dir: Union[str, Path, None] = None, suppress_eos: bool = True,
                     progress: bool = True, num_threads: Optional[int] = None,
                     info: Optional[dict] = None, done_rows: Optional[dict] = None,
                     on_batch=None) -> torch.LongTensor:
    """``nsamples`` sequences of ``seqlen`` tokens sampled from ``model`` itself: a LongTensor (nsamples, seqlen)
    on the CPU. Each sequence starts with the document-start token (``prompts="bos"``), or with one of
    :data:`GENERIC_PROMPTS` (``"generic"``, cycled), or one of the given strings (cycled), followed by tokens
    sampled at ``temperature`` from the top-``top_p`` nucleus (``temperature=0``: greedy).

    Cached under ``cache_dir`` (default ``$OPTPRUNE_CACHE_DIR`` or ``~/.cache/optprune``) in ``selfcalib/``;
    ``batch_size``: sequences decoded together (default :func:`default_batch_size`: ≤ 64, KV cache ≤ 2 GiB).
    ``cache_dir=False`` disables the cache. ``info`` (a dict), when given, is filled with the record of what
    was done: cache key and path, whether it was a cache hit, generation time, the settings.

    ``done_rows`` ({sample index: sequence}) and ``on_batch(rows, ids)``: resuming an interrupted generation
    (batches already done are taken from ``done_rows``; ``on_batch`` is called after each generated batch).

    ``num_threads``: torch CPU threads during generation (restored afterwards). Decoding runs many tiny matrix
    products, where thread synchronisation dominates: on a busy 2-core machine stories260K generated 8×512 tokens
    in 3.7 s with one thread and 123 s with two. Default (None): one thread for models under
    :data:`SMALL_MODEL_PARAMS` parameters on the CPU, torch's setting otherwise.
    """
    nsamples, seqlen, batch_size, temperature, top_p = _checked_options(model, nsamples, seqlen, batch_size,
                                                                        temperature, top_p)
    pids = _prompt_ids(tokenizer, model, prompts)
    if max(len(p) for p in pids) >= seqlen:
        raise SelfCalibrationError(f"self-calibration: seqlen {seqlen} is not longer than the prompts")
    start = pids[0][0]
    banned = _eos_ids(tokenizer, model, start) if suppress_eos else []
    prompt_desc = prompts if isinstance(prompts, str) else "list"

    key_src = {"v": _FORMAT_VERSION, "model": model_fingerprint(model), "nsamples": nsamples, "seqlen": seqlen,
               "seed": int(seed), "temperature": temperature, "top_p": top_p, "prompts": pids,
               "banned": banned}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
    rec = {"source": "self", "key": key, "model_fingerprint": key_src["model"], "nsamples": nsamples,
           "seqlen": seqlen, "seed": int(seed), "temperature": temperature, "top_p": top_p,
           "prompts": prompt_desc, "suppress_eos": bool(suppress_eos), "cache_hit": False, "cache_path": None,
           "generation_time_s": 0.0}
    path = None
    if cache_dir is not False:
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        path = root / "selfcalib" / f"{key}.pt"
        rec["cache_path"] = str(path)
        ids = _read_cache(path, nsamples, seqlen, rec)
        if ids is not None:
            if info is not None:
                info.update(rec)
            return ids

    out = _generate(model, pids, nsamples, seqlen, batch_size, seed, temperature, top_p, banned, rec,
                    progress=progress, num_threads=num_threads, done_rows=done_rows, on_batch=on_batch)
    if path is not None:
        _write_cache(path, out, rec)
    if info is not None:
        info.update(rec)
    return out


def _checked_options(model, nsamples, seqlen, batch_size, temperature, top_p) -> tuple:
    """(nsamples, seqlen, batch_size, temperature, top_p) as numbers, checked (one-line
    :class:`SelfCalibrationError`); the batch size defaults to :func:`default_batch_size`."""
    if int(nsamples) < 1:
        raise SelfCalibrationError(f"self-calibration: nsamples must be ≥ 1, got {nsamples}")
    if not (0.0 < float(top_p) <= 1.0):
        raise SelfCalibrationError(f"self-calibration: top_p must be in (0, 1], got {top_p}")
    if float(temperature) < 0.0:
        raise SelfCalibrationError(f"self-calibration: temperature must be ≥ 0, got {temperature}")
    if batch_size is None:
        batch_size = default_batch_size(model, int(nsamples), int(seqlen))
    if int(batch_size) < 1:
        raise SelfCalibrationError(f"self-calibration: batch_size must be ≥ 1, got {batch_size}")
    maxpos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if maxpos is not None and int(seqlen) > int(maxpos):
        raise SelfCalibrationError(f"self-calibration: seqlen {int(seqlen)} exceeds the model's context {maxpos}")
    return int(nsamples), int(seqlen), int(batch_size), float(temperature), float(top_p)


def _read_cache(path: Path, nsamples: int, seqlen: int, rec: dict) -> Optional[torch.Tensor]:
    """The cached sequences at ``path`` when they have the asked shape (``rec`` notes the hit), else None."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        ids = blob["ids"]
        if tuple(ids.shape) == (nsamples, seqlen) and ids.dtype == torch.long:
            rec["cache_hit"] = True
            rec["generation_time_s"] = float(blob.get("generation_time_s", 0.0))
            return ids
    except Exception:  # a corrupt/partial file: regenerate and overwrite
        pass
    return None


def _write_cache(path: Path, ids: torch.Tensor, rec: dict) -> None:
    """Store the sequences atomically; a failure (read-only home) is noted in ``rec``, never raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"ids": ids, "generation_time_s": rec["generation_time_s"],
                    "meta": json.dumps({k: v for k, v in rec.items() if k != "cache_path"})}, tmp)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop the run
        rec["cache_error"] = str(e)


def _generate(model, pids, nsamples, seqlen, batch_size, seed, temperature, top_p, banned, rec, *, progress,
              num_threads, done_rows, on_batch) -> torch.Tensor:
    """Sample the ``(nsamples, seqlen)`` sequences batch by batch (``rec["generation_time_s"]`` is set); the
    model's training flag and torch's thread count are restored afterwards."""
    # group the samples by prompt (sample i uses prompt i mod P) so that a batch needs no padding
    groups: dict[int, list[int]] = {}
    for i in range(nsamples):
        groups.setdefault(i % len(pids), []).append(i)
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    done_rows = done_rows or {}  # resume: sequences of an interrupted run (same seeds: the same tokens)
    was_training = model.training
    model.eval()
    old_threads = torch.get_num_threads()
    if num_threads is None and next(model.parameters()).device.type == "cpu" and \
            sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        num_threads = 1
    if num_threads:
        torch.set_num_threads(int(num_threads))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        total = sum((seqlen - len(pids[p])) * len(rows) for p, rows in groups.items())
        bar = tqdm(total=total, desc="self-calibration (tokens)", unit="tok", leave=False)
    t0 = time.perf_counter()
    try:
        for p, rows in groups.items():
            for b in range(0, len(rows), batch_size):
                chunk = rows[b:b + batch_size]
                if all(i in done_rows for i in chunk):
                    out[chunk] = torch.stack([done_rows[i] for i in chunk])
                    continue
                out[chunk] = _generate_batch(model, pids[p], chunk, seqlen, seed, temperature, top_p, banned, bar)
                if on_batch is not None:  # checkpoint of the sequences produced so far
                    on_batch(chunk, out[chunk])
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
        torch.set_num_threads(old_threads)
    rec["generation_time_s"] = time.perf_counter() - t0
    return out


def heldout_sequences(model, tokenizer, nsamples: int = 16, seqlen: int = 512, *, seed: int = 0, **kw):
    """Held-out self-generated sequences for the data-free evaluation: :func:`self_calibration` with
    ``seed + HELDOUT_SEED_OFFSET`` (never the calibration draw)."""
    return self_calibration(model, tokenizer, nsamples, seqlen, seed=int(seed) + HELDOUT_SEED_OFFSET, **kw)

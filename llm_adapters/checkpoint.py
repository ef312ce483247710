"""Long runs: atomic output, per-block checkpoints, resume, and clean interruption.

**Atomic output** (:func:`atomic_output`): a run writes into ``.<name>.optprune-tmp-<pid>/`` beside the target
(same file system) and renames it into place at the end. An existing target (``--overwrite``) is renamed aside
first and deleted only once the new one is in place; an interrupted or failed run deletes its temporary folder
and leaves the target as it was.

**Checkpoints** (:class:`Checkpoint`): after every pruned block, the block's modules as pruned (weights, masks,
shrunk shapes — a pickled ``torch.save`` of the block) and its records go to ``block_<i>.pt``; self-generated
calibration sequences are saved batch by batch as they are produced, then as ``calib.pt``. ``manifest.json``
holds the settings the checkpoint belongs to; ``--resume`` refuses a checkpoint made with other settings. The
default folder is ``.<name>.optprune-checkpoint/`` beside the output; it is kept when a run is interrupted or
fails and deleted when the output is complete.

**Resume** (:meth:`Checkpoint.run_pipeline`): the propagated activations are recomputed, not stored. In
``sequential`` mode the pruned blocks are put back and the pipeline prunes the remaining blocks, propagating
the calibration through the restored ones exactly as the first run did; in ``dense-input`` mode the remaining
blocks are pruned on the dense stream and the restored blocks are put back afterwards. With one thread on the
CPU a resumed run is bit-identical to an uninterrupted one.

**Interruption**: the CLI turns SIGINT/SIGTERM into :class:`Interrupted` (exit 130/143) through
:func:`install_signal_handlers`; a signal is remembered, so a library that catches the exception cannot swallow
it (:func:`raise_if_interrupted` runs at every checkpoint).

Test hook: ``OPTPRUNE_TEST_INTERRUPT=block:K`` sends the process SIGINT once block ``K``'s checkpoint is saved,
``calibration`` once a batch of self-generated calibration is saved, ``save`` once the model files are written
into the temporary output (``…:TERM`` sends SIGTERM instead).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

__all__ = ["Checkpoint", "Interrupted", "atomic_output", "default_checkpoint_dir", "install_signal_handlers",
           "raise_if_interrupted", "interrupted_signal", "CheckpointError", "run_key", "as_write_error", "WriteError"]

MANIFEST = "manifest.json"
_FORMAT = "optprune-checkpoint/1"
ENV_TEST = "OPTPRUNE_TEST_INTERRUPT"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (one line)."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM: the run stops; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


# ============================================================================================ signals
_STATE = {"signum": None}


def _handler(signum, frame):
    _STATE["signum"] = signum
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` (main thread only) and are remembered."""
    _STATE["signum"] = None
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(s, _handler)
        except ValueError:  # not the main thread
            return


def interrupted_signal() -> Optional[int]:
    """The signal received since :func:`install_signal_handlers`, or None."""
    return _STATE["signum"]


def raise_if_interrupted() -> None:
    if _STATE["signum"] is not None:
        raise Interrupted(_STATE["signum"])


def _test_hook(point: str) -> None:
    spec = os.environ.get(ENV_TEST)
    if not spec:
        return
    term = spec.endswith(":TERM")
    if (spec[:-5] if term else spec) == point:
        os.kill(os.getpid(), signal.SIGTERM if term else signal.SIGINT)
        time.sleep(0.1)  # the handler runs here


# ============================================================================================ write failures
class WriteError(OSError):
    """Writing the output or a checkpoint failed (disk full, read-only, gone); ``filename`` names the file."""


def as_write_error(e: BaseException, path, *, writing: bool = False) -> Optional[WriteError]:
    """``e`` as a :class:`WriteError` naming ``path`` when it is a failed write, else None. torch.save and
    safetensors report a full disk in their own exception types (``[enforce fail at inline_container.cc]
    ... file write failed``, ``SafetensorError ... StorageFull``); this gives every write failure one form.
    ``writing``: ``e`` came from code that only writes, so any OSError is a failed write (otherwise only a
    full disk or quota, a read-only file system, a file too large or an I/O error count)."""
    import errno
    if isinstance(e, WriteError):
        return e
    if isinstance(e, OSError):
        if writing or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO):
            return WriteError(e.errno, e.strerror or str(e), e.filename or str(path))
        return None
    text = str(e)
    low = text.lower()
    if not (type(e).__name__ == "SafetensorError" or isinstance(e, RuntimeError) and (
            "pytorchstreamwriter" in low or "inline_container" in low or "write failed" in low)):
        return None
    full = any(w in low for w in ("storagefull", "no space", "os error 28", "quota"))
    if not full:
        with contextlib.suppress(OSError):
            p = Path(path)
            while not p.exists() and p != p.parent:
                p = p.parent
            full = shutil.disk_usage(p).free < (1 << 20)
    if full:
        return WriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return WriteError(errno.EIO, "the write was cut short, disk full?", str(path))


# ============================================================================================ atomic output
def _sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.optprune-{tag}"


def default_checkpoint_dir(out: Path) -> Path:
    return _sibling(Path(out).expanduser().resolve(), "checkpoint")


@contextlib.contextmanager
def atomic_output(out: Path, *, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on normal exit it replaces ``out`` (rename), otherwise it is
    deleted and ``out`` is left as it was."""
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, f"tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _test_hook("save")
        raise_if_interrupted()
        _normalise_modes(tmp)
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _normalise_modes(root: Path) -> None:
    """Give the output the permissions a plain copy would have under the current umask (files 0666 & ~umask,
    folders 0777 & ~umask): some writers (transformers' safetensors save among them) create owner-only files,
    which a server running as another user could not read."""
    um = os.umask(0)
    os.umask(um)
    for d, dirs, files in os.walk(root):
        os.chmod(d, 0o777 & ~um)
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~um)


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """rename ``tmp`` → ``out``; an existing ``out`` is renamed aside first and deleted after. Signals are held
    back meanwhile so that the target is never missing; one that arrives then finds the run complete and is
    dropped."""
    old = None
    mask = {signal.SIGINT, signal.SIGTERM}
    prev = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        if out.exists():
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            elif not overwrite:
                raise CheckpointError(f"--output {out} appeared during the run; the result is not saved (pass "
                                      f"--overwrite to replace it)")
            else:
                old = _sibling(out, f"old-{os.getpid()}")
                os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        while signal.sigtimedwait(mask, 0) is not None:  # too late to stop: the output is complete
            pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, prev)


# ============================================================================================ checkpoints
def run_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Checkpoint:
    """The checkpoint folder of one run (module doc)."""

    def __init__(self, path: Path, settings: dict, *, resume: bool, explicit: bool):
        self.path = Path(path).expanduser().resolve()
        self.settings = json.loads(json.dumps(settings, default=str))
        self.key = run_key(self.settings)
        self.explicit = explicit
        self.resume = resume
        self.done: dict = {}  # block index -> file
        self.calib = None
        self.calib_info: dict = {}
        self.calib_rows: dict = {}
        if resume:
            self._open()
        elif self.path.exists() and any(self.path.iterdir()):
            if not (self.path / MANIFEST).is_file():
                what = "--checkpoint-dir" if explicit else "the checkpoint folder of --output,"
                fix = "choose another --checkpoint-dir" if explicit else "move it away or choose another --output"
                raise CheckpointError(f"{what} {self.path} is a non-empty folder that is not an optprune "
                                      f"checkpoint; {fix}")
            raise CheckpointError(f"a checkpoint of an earlier run is in {self.path}: pass --resume to continue it, "
                                  f"or delete that folder to start over")

    # ---------------------------------------------------------------- reading
    def _open(self) -> None:
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise CheckpointError(f"--resume: no checkpoint in {self.path} (nothing to resume; run without "
                                  f"--resume to start)")
        try:
            man = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{mf}: damaged checkpoint manifest ({e})") from None
        if man.get("format") != _FORMAT:
            raise CheckpointError(f"{mf}: unknown checkpoint format {man.get('format')!r}")
        if man.get("key") != self.key:
            old = man.get("settings", {})
            diff = [k for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
            k = diff[0] if diff else "?"
            raise CheckpointError(f"--resume: the checkpoint in {self.path} was made with other settings "
                                  f"({k}: {old.get(k)!r} there, {self.settings.get(k)!r} now)")
        for b in man.get("blocks", []):
            f = self.path / f"block_{int(b)}.pt"
            if f.is_file():
                self.done[int(b)] = f
        if (self.path / "calib.pt").is_file():
            blob = self._load(self.path / "calib.pt")
            self.calib, self.calib_info = blob["ids"], dict(blob.get("info") or {}, from_checkpoint=True)
        elif (self.path / "calib_partial.pt").is_file():
            self.calib_rows = self._load(self.path / "calib_partial.pt")["rows"]

    @staticmethod
    def _load(f: Path):
        import torch
        try:
            return torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a file cut short by a crash
            raise CheckpointError(f"{f}: damaged checkpoint file ({type(e).__name__}); delete it to redo that "
                                  f"part") from None

    # ---------------------------------------------------------------- writing
    def _write_manifest(self) -> None:
        man = {"format": _FORMAT, "key": self.key, "settings": self.settings, "blocks": sorted(self.done),
               "calibration": self.calib is not None}
        self._write(MANIFEST, lambda tmp: tmp.write_text(json.dumps(man, indent=1)))

    def _save(self, obj, name: str) -> Path:
        import torch
        return self._write(name, lambda tmp: torch.save(obj, tmp))

    def _write(self, name: str, write) -> Path:
        """``write(tmp)`` then rename to ``name``. A failed write (disk full...) leaves no partial file, and a
        checkpoint without a manifest (nothing resumable yet) is removed: it would only block the next run."""
        f = self.path / name
        tmp = self.path / f"{name}.tmp"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, f)
        except (OSError, RuntimeError, ValueError) as e:
            err = as_write_error(e, f, writing=isinstance(e, OSError))
            if err is None:
                raise
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not self.usable():
                shutil.rmtree(self.path, ignore_errors=True)
            raise err from None
        return f

    def usable(self) -> bool:
        """Whether the folder holds a checkpoint ``--resume`` can continue (its manifest was written)."""
        return (self.path / MANIFEST).is_file()

    def save_calib_rows(self, rows, ids) -> None:
        """Self-generated calibration: sequences ``rows`` just produced."""
        for i, r in enumerate(rows):
            self.calib_rows[int(r)] = ids[i].clone()
        self._save({"rows": self.calib_rows}, "calib_partial.pt")
        self._write_manifest()
        _test_hook("calibration")
        raise_if_interrupted()

    def save_calib(self, ids, info: Optional[dict] = None) -> None:
        self.calib, self.calib_info = ids, dict(info or {})
        self._save({"ids": ids, "info": self.calib_info}, "calib.pt")
        (self.path / "calib_partial.pt").unlink(missing_ok=True)
        self._write_manifest()
        raise_if_interrupted()

    def on_block(self, bi: int, block, layers: list, block_rec: dict) -> None:
        """Pipeline callback: block ``bi`` is pruned (its records ``layers`` and ``block_rec``)."""
        self.done[int(bi)] = self._save({"block": block, "layers": layers, "record": block_rec}, f"block_{bi}.pt")
        self._write_manifest()
        _test_hook(f"block:{bi}")
        raise_if_interrupted()

    # ---------------------------------------------------------------- resuming
    def run_pipeline(self, fn, model, calib_ids, config, **kw) -> Optional[dict]:
        """``fn(model, calib_ids, config, on_block=..., **kw)`` (the pipeline) over the blocks not checkpointed
        yet, with the checkpointed ones put back (module doc); the records of all blocks merged."""
        from .architectures import get_arch, get_module
        arch = get_arch(model)
        blocks = get_module(model, arch.blocks)
        wanted = list(config.blocks) if config.blocks is not None else list(range(len(blocks)))
        done = {b: f for b, f in self.done.items() if b in wanted}
        saved = {b: self._load(f) for b, f in sorted(done.items())}

        def put_back():
            for b, blob in saved.items():
                dev = next(blocks[b].parameters()).device
                blocks[b] = blob["block"].to(dev)

        if config.mode == "sequential":
            put_back()
        remaining = [b for b in wanted if b not in done]
        res = None
        if remaining:
            old = config.blocks
            config.blocks = remaining
            try:
                res = fn(model, calib_ids, config, on_block=self.on_block, **kw)
            finally:
                config.blocks = old
            if res is None:
                return None
        else:
            res = {"time_s": 0.0, "layers": [], "blocks": []}
        if config.mode != "sequential":
            put_back()
        if saved:
            res["layers"] = [r for b in saved.values() for r in b["layers"]] + list(res.get("layers", []))
            res["blocks"] = [b["record"] for b in saved.values()] + list(res.get("blocks", []))
            res["layers"].sort(key=lambda r: r.get("block", 0))
            res["blocks"].sort(key=lambda r: r.get("block", 0))
            res["resumed_blocks"] = sorted(saved)
            tot = sum(math.prod(r["shape"]) for r in res["layers"])
            res["sparsity"] = sum(r["sparsity"] * math.prod(r["shape"]) for r in res["layers"]) / tot if tot else 0.0
        return res

    def remove(self) -> None:
        """The run is complete: delete the checkpoint."""
        if (self.path / MANIFEST).is_file() or not self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

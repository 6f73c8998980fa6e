"""Checkpoints that survive faults: written whole or not at all, and resumed from the newest one
that loads.

A process killed while a checkpoint is written must never leave a file that a later
``resume=auto`` reads as good. :class:`AtomicCheckpointIO` writes to a temporary name in the
same directory, flushes it to disk (``fsync``), then renames it over the final name
(``os.replace``, atomic on POSIX file systems) and syncs the directory: a reader sees the old
file or the new one, never half of one. Lightning's own ``_atomic_save`` goes through an fsspec
transaction that renames but does not ``fsync``; on a machine that loses power a rename can
reach the disk before the data it names.

``resume=auto`` (:func:`resolve_resume`) takes the newest checkpoint of the run that loads:
``last.ckpt`` unless a periodic ``step*.ckpt`` is newer or ``last.ckpt`` is damaged, with a
warning naming every file it skipped and the one it used.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_modules.lm import FORMAT, FORMAT_KEY
from settings.loading import ConfigError

log = logging.getLogger("train")

STEP_FILE = re.compile(r"step(\d+)\.ckpt")
TEMPORARY = ".tmp-"  # the infix of a checkpoint still being written: `.<name>.tmp-<pid>`


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission): names the path."""

    exit_status = 1


def fsync_dir(directory: Path) -> None:
    """Makes a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Watched:
    """A file whose first write error is kept: torch.save reports a failed write as its own
    RuntimeError ("unexpected pos ..."), hiding the OSError (disk full, quota) that a person
    needs to read."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self):
        return self.f.flush()


def atomic_write(path: str | Path, write) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, flushes it to disk and renames
    it to ``path``. On any error the temporary file is removed, ``path`` is left as it was, and
    a :class:`CheckpointWriteError` names the path and the cause."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMPORARY}{os.getpid()}")
    watched = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            watched = _Watched(f)
            write(watched)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        cause = (watched and watched.error) or err
        why = getattr(cause, "strerror", None) or str(cause)
        kept = f"{str(path)!r} is as it was" if path.exists() else "nothing was written"
        raise CheckpointWriteError(
            f"could not write checkpoint {str(path)!r}: {why} ({kept}); free space or "
            "choose a writable run_dir, then resume=auto"
        ) from cause
    fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, saving local files through :func:`atomic_write` (remote
    URLs keep Lightning's fsspec path)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):  # a remote file system: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def check_checkpoint(path: str | Path) -> dict:
    """Loads a checkpoint (tensors memory-mapped, not read), or raises a ConfigError naming the
    path and what is wrong: missing, unreadable (truncated, not a checkpoint), of another
    project, or of another format version."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # any unreadable file: pickle, zip and torch errors alike
        raise ConfigError(f"{str(path)!r} is not a readable PyTorch checkpoint: {err}") from err
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "model" not in hparams or "state_dict" not in ckpt:
        raise ConfigError(
            f"{str(path)!r} is not a checkpoint of this project (no model config "
            "in its hyper_parameters)"
        )
    found = ckpt.get(FORMAT_KEY, FORMAT)  # checkpoints from before the marker are format 1
    if found != FORMAT:
        raise ConfigError(
            f"{str(path)!r} has checkpoint format {found!r}; this version reads format "
            f"{FORMAT} only (use the version of the code that wrote it)"
        )
    return ckpt


def load_weights(module: torch.nn.Module, path: str | Path) -> int:
    """Copies the weights of the checkpoint at ``path`` into ``module`` (a CausalLM) and returns
    the step they were saved at. Only the weights: the optimizer, the schedule, the step and
    the data position start afresh, which is what a curriculum stage (a longer sequence after
    a shorter one) or fine-tuning wants. Every tensor must exist in both with the same shape;
    the attention type may differ (it has no weights of its own). A ConfigError lists what
    does not match."""
    ckpt = check_checkpoint(path)
    theirs, ours = ckpt["state_dict"], module.state_dict()
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = [
        f"{name} {tuple(theirs[name].shape)} vs {tuple(ours[name].shape)}"
        for name in sorted(set(ours) & set(theirs))
        if theirs[name].shape != ours[name].shape
    ]
    if missing or unexpected or shapes:
        problems = [
            *(["missing: " + ", ".join(missing[:4])] if missing else []),
            *(["not in this model: " + ", ".join(unexpected[:4])] if unexpected else []),
            *(["shapes (checkpoint vs this model): " + "; ".join(shapes[:4])] if shapes else []),
        ]
        raise ConfigError(
            f"init_from={str(path)!r} does not fit this model ({'; '.join(problems)}); its "
            "model must have the same width, depth, heads, feed-forward and vocabulary"
        )
    module.load_state_dict(theirs)
    return int(ckpt.get("global_step", 0))


def candidates(directory: Path) -> list[Path]:
    """The run's checkpoints, newest first by name: last.ckpt, then step files by step."""
    steps = sorted(
        (p for p in directory.glob("step*.ckpt") if STEP_FILE.fullmatch(p.name)),
        key=lambda p: int(STEP_FILE.fullmatch(p.name).group(1)),
        reverse=True,
    )
    last = directory / "last.ckpt"
    return ([last] if last.exists() else []) + steps


def newest_loadable(directory: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the checkpoint with the highest global step among those that load, [(skipped, why)]).
    Files are tried newest first and the search stops at the first that loads unless a step
    file past it could still be newer (``last.ckpt`` is written after the step file of the
    same step, so a kill between the two leaves the step file newer)."""
    best, best_step, skipped = None, -1, []
    for path in candidates(directory):
        match = STEP_FILE.fullmatch(path.name)
        if best is not None and match and int(match.group(1)) <= best_step:
            break  # every remaining step file is older than what we have
        try:
            step = int(check_checkpoint(path).get("global_step", 0))
        except ConfigError as err:
            skipped.append((path, str(err)))
            continue
        if step > best_step:
            best, best_step = path, step
    return best, skipped


def remove_partial_writes(directory: Path) -> None:
    """Deletes temporary files left by a process killed while writing a checkpoint."""
    for tmp in directory.glob(f".*.ckpt{TEMPORARY}*"):
        log.warning("removing %s, a checkpoint whose writing was interrupted", tmp)
        tmp.unlink(missing_ok=True)


def resolve_resume(resume: str | None, directory: Path, run_dir: str) -> str | None:
    """The checkpoint to resume from, or None; refuses to start afresh over a run's checkpoints
    (that would overwrite them). ``auto``: the newest that loads, warning about any skipped;
    a path: that file, or a ConfigError naming it."""
    if resume is None:
        if candidates(directory):
            raise ConfigError(
                f"run_dir={run_dir!r} already holds checkpoints; pass "
                "resume=auto to continue it, or choose another run_dir"
            )
        return None
    if resume != "auto":
        check_checkpoint(resume)
        return str(resume)
    remove_partial_writes(directory)
    best, skipped = newest_loadable(directory)
    for path, why in skipped:
        log.warning("resume=auto skips %s: %s", path, why)
    if skipped and best is None:
        log.warning("resume=auto: no checkpoint of %s loads; starting afresh", directory)
    elif skipped:
        log.warning("resume=auto uses %s instead", best)
    return str(best) if best else None


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint every ``checkpoint.every_n_steps``, and at the last step too.

    Lightning writes ``last.ckpt`` when it writes a periodic checkpoint; a run whose
    ``max_steps`` is not a multiple of the period ended with ``last.ckpt`` one partial period
    old (800 steps, every 250: the weights of step 750), so eval.py scored, ``init_from``
    started from and ``resume=auto`` continued from weights that were not the run's last.
    After the final step this writes the step file and ``last.ckpt`` unless that step was
    saved already (a preemption's save, or a multiple of the period)."""

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self._should_skip_saving_checkpoint(trainer) or trainer.global_step == 0:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

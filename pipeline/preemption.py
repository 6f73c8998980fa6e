"""Preemption: SIGTERM (what cluster schedulers send before they kill) or SIGINT (Ctrl-C) saves
a checkpoint at the end of the current step and stops the run; a second signal exits at once.

Lightning's own SIGTERM handling stops after the step *without* saving, and a Ctrl-C raises
KeyboardInterrupt wherever the code happens to be. This callback installs its handlers when
training starts (after Lightning registered its own, which it replaces; under SLURM with
auto-requeue Lightning's are kept and called too, so its requeue on SIGUSR1 and its SIGTERM
handling stay as they are). The handler only records the signal; the save happens between
steps, where the state is that of a finished step, and every rank takes the same decision (an
any-rank reduction each step), so that all of them save the same step.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved: ends ``trainer.fit`` at once (no final
    validation); train.py turns it into exit status 128 + the signal number."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        self.exit_status = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint "
            f"{path}; continue with: {continue_command(path.parents[1])}"
        )


def continue_command(run_dir: Path) -> str:
    """The command line that resumes this run: train.py's own arguments with ``resume=auto``
    when train.py is the program, else (a study, a notebook) train.py on the run's resolved
    config.yaml, which holds every setting."""
    if os.path.basename(sys.argv[0]) == "train.py":
        args = [a for a in sys.argv[1:] if not a.startswith("resume=")]
        return shlex.join(["python", sys.argv[0], *args, "resume=auto"])
    return shlex.join(["python", "train.py", str(run_dir / "config.yaml"), "resume=auto"])


class Preemption(Callback):
    """Saves ``<run_dir>/checkpoints/last.ckpt`` and stops after the step a SIGTERM or SIGINT
    arrived in; also flushes the loggers with every checkpoint (see on_save_checkpoint)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "checkpoints" / "last.ckpt"
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._keep_lightning = False  # under SLURM auto-requeue: call Lightning's handler too

    # -- the handler: record, or on a second signal exit now ---------------------------------

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        self.signum = signum
        log.warning(
            "received %s: saving a checkpoint at the end of this step, then stopping "
            "(send it again to exit at once)",
            signal.Signals(signum).name,
        )
        previous = self._previous.get(signum)
        if self._keep_lightning and callable(previous):
            previous(signum, frame)

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled by the main thread
        env = trainer._accelerator_connector.cluster_environment
        self._keep_lightning = isinstance(env, SLURMEnvironment) and env.auto_requeue
        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous.items():
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signum, handler)
        self._previous = {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """Logged rows up to a checkpoint reach the disk before it: a run killed later re-logs
        the steps after it and loses none before (CSVLogger otherwise writes every 100 steps).
        Lightning logs a step's row only after the step's checkpoint hooks, so that row's loss
        is written here too (a duplicate of the same value follows)."""
        loss = getattr(pl_module, "last_window_loss", None)
        for logger in trainer.loggers:
            if trainer.training and loss is not None:
                logger.log_metrics({"train/loss": float(loss)}, step=trainer.global_step - 1)
            logger.save()

    # -- between steps: save and stop --------------------------------------------------------

    def _signalled(self, trainer) -> bool:
        """Whether any rank received a signal (every rank must save the same step)."""
        return bool(trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False))

    def _save_and_stop(self, trainer) -> None:
        trainer.save_checkpoint(self.path)
        signum = self.signum if self.signum is not None else signal.SIGTERM
        raise Preempted(signum, trainer.global_step, self.path)  # train.py prints it

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._signalled(trainer):
            self._save_and_stop(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        """A signal during validation: the step is done and so is its validation."""
        if trainer.training is False and trainer.state.fn == "fit" and self._signalled(trainer):
            self._save_and_stop(trainer)

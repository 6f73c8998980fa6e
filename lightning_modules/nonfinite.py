"""A step that diverged is not applied: the NonFiniteGuard callback (``optim.nonfinite``).

A single NaN or infinite loss or gradient would otherwise reach AdamW and poison its moments
for good: every later step would be NaN too, and the checkpoints after it worthless. The guard
looks once per optimizer step, after the backward and before clipping and the update, at every
loss backpropagated since the last step (all micro-batches under gradient accumulation) and at
the gradient norm. A bad step is skipped (its gradients dropped: ``grad = None`` makes AdamW
change neither the weights nor its moments) or stops the run, and every rank decides alike.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from lightning_modules.optim import NONFINITE

log = logging.getLogger("train")


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or gradient norm under ``optim.nonfinite=stop``, or more consecutive
    ones than ``optim.max_nonfinite_steps`` under ``skip``; the weights are those of the last
    good step (the bad one was not applied)."""

    exit_status = 1  # settings/cli.py: the message, then this exit status


def describe(batch: tuple[int, object]) -> str:
    """``batch 3 (sequences [12, 40])``: what a step read, for a warning."""
    index, sequences = batch
    return f"batch {index}" + ("" if sequences is None else f" (sequences {sequences.tolist()})")


class NonFiniteGuard(L.Callback):
    """``policy``: ``skip`` (up to ``max_steps`` bad steps in a row, then stop) or ``stop``."""

    def __init__(self, policy: str = "skip", max_steps: int = 10):
        if policy not in NONFINITE or max_steps < 1:
            raise ValueError(
                f"optim.nonfinite must be one of {NONFINITE} and optim.max_nonfinite_steps >= 1, "
                f"got {policy!r}, {max_steps}"
            )
        self.policy, self.max_steps = policy, max_steps
        self._finite = True  # every loss of the step being accumulated was finite (a tensor)
        self._read: list[tuple[int, object]] = []  # what the step read, to name in a warning
        self._bad_steps = 0  # consecutive skipped steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._read.append((batch_idx, batch.get("index")))  # named only if the step fails

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._finite = torch.isfinite(loss.detach()) & self._finite  # no sync here

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else 0
        bad = not bool(self._finite & torch.isfinite(torch.as_tensor(norm)))  # one sync
        bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        read, self._finite, self._read = self._read, True, []
        if not bad:
            self._bad_steps = 0
            return
        self._bad_steps += 1
        what = (
            f"step {trainer.global_step + 1}: non-finite loss or gradient norm "
            f"(gradient norm {float(norm)}; {', '.join(map(describe, read))})"
        )
        if self.policy == "stop" or self._bad_steps > self.max_steps:
            why = "optim.nonfinite=stop" if self.policy == "stop" else (
                f"{self._bad_steps} consecutive such steps > "
                f"optim.max_nonfinite_steps={self.max_steps}"
            )  # fmt: skip
            raise NonFiniteLoss(
                f"{what}; stopping ({why}). The step was not applied; the last checkpoint "
                "holds the last good weights (lower optim.lr or raise gradient_clip_val)"
            )
        log.warning("%s; skipped, not applied (%d in a row)", what, self._bad_steps)
        for p in pl_module.parameters():
            p.grad = None
        pl_module.log("train/skipped_steps", float(self._bad_steps))

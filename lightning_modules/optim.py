"""OptimConfig and what it builds: AdamW and the learning-rate schedule.

Plain PyTorch, no Lightning: ``settings/schema.py`` types its ``optim`` section with
OptimConfig, and a config (``import settings.schema``) must load without importing Lightning.

AdamW decays only weights of two or more dimensions (not norms' gains, not biases). The
learning rate warms up linearly, then decays polynomially (the paper's schedule) or by a
cosine, or stays constant, over ``total_steps`` (by default ``trainer.max_steps``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

import torch

LRSchedule = Literal["polynomial", "cosine", "constant"]
LR_SCHEDULES = get_args(LRSchedule)
NonFinite = Literal["skip", "stop"]
NONFINITE = get_args(NonFinite)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (the paper's: linear warm-up, polynomial decay)."""

    lr: float = 6.0e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW
    eps: float = 1.0e-8  # AdamW
    weight_decay: float = 0.01  # on weights of 2 or more dimensions only
    warmup_steps: int = 750  # linear warm-up
    schedule: LRSchedule = "polynomial"  # after warm-up, to max_steps
    power: float = 1.0  # polynomial decay power (1: linear)
    min_lr_ratio: float = 0.0  # final lr / peak lr
    total_steps: int | None = None  # length of the schedule; null: trainer.max_steps
    nonfinite: NonFinite = "skip"  # a step with a non-finite loss or gradient norm: skip | stop
    max_nonfinite_steps: int = 10  # skip: consecutive such steps before the run stops

    def __post_init__(self):
        self.betas = list(self.betas)
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0 or self.warmup_steps < 0 or len(self.betas) != 2:
            raise ValueError(
                f"optim needs lr > 0, warmup_steps >= 0 and two betas, got lr={self.lr}, "
                f"warmup_steps={self.warmup_steps}, betas={self.betas}"
            )
        if self.nonfinite not in NONFINITE or self.max_nonfinite_steps < 1:
            raise ValueError(
                f"optim.nonfinite must be one of {NONFINITE} and optim.max_nonfinite_steps >= 1, "
                f"got {self.nonfinite!r}, {self.max_nonfinite_steps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @classmethod
    def from_dict(cls, d: dict | None) -> OptimConfig:
        """Builds from a plain dict (a checkpoint's hyper-parameters; None: the defaults); an
        unknown key is an error naming it and the accepted ones."""
        d = d or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown optim keys {unknown}; accepted: {sorted(known)}")
        return cls(**d)


def lr_factor(
    step: int, warmup: int, total: int, schedule: str, power: float, min_ratio: float
) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        decay = (1 - progress) ** power
    return min_ratio + (1 - min_ratio) * decay


def adamw_with_schedule(
    params: Iterable[torch.nn.Parameter], o: OptimConfig, max_steps: int
) -> dict:
    """Lightning's ``configure_optimizers`` answer: AdamW over ``params`` and the per-step
    schedule, ``o.total_steps`` long (null: ``max_steps``; neither: no decay in practice)."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
    )
    total = o.total_steps or (max_steps if max_steps > 0 else 10**9)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda step: lr_factor(step, o.warmup_steps, total, o.schedule, o.power, o.min_lr_ratio),
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

"""CausalLM: any ModelConfig trained as a causal language model, optionally with each window
split across ``context_parallel`` ranks (sequence parallelism, dilated attention).

Loss is token-level cross-entropy in float32. Validation perplexity is
``exp(sum of NLL / number of tokens)`` with both sums kept in float64 and reduced across ranks:
never a mean of per-batch perplexities. AdamW decays only weights of two or more dimensions;
the learning rate warms up linearly, then decays polynomially (the paper's schedule) or by a
cosine, both sized from ``trainer.max_steps``.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Literal, get_args

import lightning as L
import torch
import torch.distributed as dist

from data.recall import IGNORE
from models.loss import chunked_nll
from models.transformer import ModelConfig, TransformerLM

# every checkpoint carries this key (on_save_checkpoint); a checkpoint with another number was
# written by an incompatible version and is refused (pipeline/checkpoints.py)
FORMAT_KEY, FORMAT = "longnet_lightning_format", 1

Schedule = Literal["polynomial", "cosine", "constant"]
SCHEDULES = get_args(Schedule)
NonFinite = Literal["skip", "stop"]
NONFINITE = get_args(NonFinite)
log = logging.getLogger("train")


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or gradient norm under ``optim.nonfinite=stop``, or more consecutive
    ones than ``optim.max_nonfinite_steps`` under ``skip``; the weights are those of the last
    good step (the bad one was not applied)."""

    exit_status = 1


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (the paper's: linear warm-up, polynomial decay)."""

    lr: float = 6.0e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW
    eps: float = 1.0e-8  # AdamW
    weight_decay: float = 0.01  # on weights of 2 or more dimensions only
    warmup_steps: int = 750  # linear warm-up
    schedule: Schedule = "polynomial"  # after warm-up, to max_steps
    power: float = 1.0  # polynomial decay power (1: linear)
    min_lr_ratio: float = 0.0  # final lr / peak lr
    total_steps: int | None = None  # length of the schedule; null: trainer.max_steps
    nonfinite: NonFinite = "skip"  # a step with a non-finite loss or gradient norm: skip | stop
    max_nonfinite_steps: int = 10  # skip: consecutive such steps before the run stops

    def __post_init__(self):
        self.betas = list(self.betas)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
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


def describe(batch: tuple[int, torch.Tensor | None]) -> str:
    """``batch 3 (sequences [12, 40])``: what a step read, for a warning."""
    index, sequences = batch
    return f"batch {index}" + ("" if sequences is None else f" (sequences {sequences.tolist()})")


class CausalLM(L.LightningModule):
    def __init__(self, model: dict, optim: dict | None = None, run_config: dict | None = None):
        """``model``: ModelConfig fields; ``optim``: OptimConfig fields (its defaults for the
        missing ones); ``run_config``: the whole resolved run config, kept only so that it
        travels in every checkpoint. Plain dicts, so that checkpoints load without this code's
        classes."""
        super().__init__()
        self.save_hyperparameters()  # load_from_checkpoint rebuilds from these alone
        self.config = ModelConfig.from_dict(model)
        self.model = TransformerLM(self.config)
        self.optim = OptimConfig(**(optim or {}))
        # sequence parallelism: P consecutive ranks split each window (paper 3.1)
        self.context_parallel = int((run_config or {}).get("context_parallel", 1))
        self.loss_chunk = int((run_config or {}).get("loss_chunk", 8192))
        self.cp_group = None
        self._step_start: float | None = None
        self._finite = True  # every loss of the step being accumulated was finite
        self._step_batches: list[str] = []  # what the step read, to name in a warning
        self._bad_steps = 0  # consecutive skipped steps

    def setup(self, stage: str) -> None:
        """With context_parallel = P > 1, every rank makes the process groups of P consecutive
        ranks (in the same order) and keeps its own."""
        P = self.context_parallel
        if P == 1 or self.cp_group is not None:
            return
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world % P:
            raise ValueError(
                f"context_parallel={P} must divide the number of processes "
                f"(trainer.devices x num_nodes = {world})"
            )
        groups = [dist.new_group(list(range(g * P, (g + 1) * P))) for g in range(world // P)]
        self.cp_group = groups[rank // P]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a window ``(B, N)`` shared by its context-parallel group."""
        if self.cp_group is None:
            return x
        n = x.shape[1] // self.context_parallel
        j = dist.get_rank(self.cp_group)
        return x[:, j * n : (j + 1) * n]

    def nll(self, batch: dict) -> torch.Tensor:
        """Negative log-likelihood ``(T,)`` in float32 of the scored tokens of this rank's slice
        of the window (all of them, or those whose label is not ``IGNORE``: label masking, as
        ``data.source=recall`` scores only answers)."""
        return self._scored(batch)[0]

    def _scored(self, batch: dict):
        """(nll (T,), hidden (T, C)) of the scored tokens of this rank's slice."""
        inputs, labels = self._local(batch["input_ids"]), self._local(batch["labels"])
        hidden = self.model.hidden(inputs, group=self.cp_group).flatten(0, 1)  # (B*N, C)
        labels = labels.flatten()
        if "distances" in batch:  # a masked source: keep the scored rows only
            keep = labels != IGNORE
            hidden, labels = hidden[keep], labels[keep]
        weight = self.model.lm_head.weight  # no N x V logits: the loss runs in chunks
        return chunked_nll(hidden, weight, labels, self.loss_chunk), hidden, labels

    # -- training ----------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        nll = self.nll(batch)
        if self.cp_group is None:
            loss = window_loss = nll.mean()
        else:
            # the window's mean loss is the sum over its P slices; data parallelism averages
            # gradients over all ranks, so each slice's term is scaled by P
            tokens = (batch["labels"] != IGNORE).sum()
            loss = nll.sum() * (self.context_parallel / tokens)
            window_loss = nll.detach().sum()
            dist.all_reduce(window_loss, group=self.cp_group)
            window_loss = window_loss / tokens
        self.last_window_loss = window_loss.detach()  # written beside checkpoints (preemption.py)
        self._finite = torch.isfinite(self.last_window_loss) & self._finite  # no sync here
        self._step_batches.append((batch_idx, batch.get("index")))  # named only if it fails
        self.log("train/loss", window_loss, prog_bar=True)
        self.log("train/ppl", window_loss.detach().exp())
        return loss

    # -- a step that diverged is not applied --------------------------------------------------

    def on_before_optimizer_step(self, optimizer) -> None:
        """Before clipping and the update: a non-finite loss or gradient norm drops the step's
        gradients (``grad = None``: AdamW then changes neither the weights nor its moments), or
        stops the run (``optim.nonfinite``). Every rank takes the same decision."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else 0
        bad = not bool(self._finite & torch.isfinite(torch.as_tensor(norm)))  # one sync
        bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))
        read, self._finite, self._step_batches = self._step_batches, True, []
        if not bad:
            self._bad_steps = 0
            return
        self._bad_steps += 1
        what = (
            f"step {self.trainer.global_step + 1}: non-finite loss or gradient norm "
            f"(gradient norm {float(norm)}; {', '.join(map(describe, read))})"
        )
        if self.optim.nonfinite == "stop" or self._bad_steps > self.optim.max_nonfinite_steps:
            why = "optim.nonfinite=stop" if self.optim.nonfinite == "stop" else (
                f"{self._bad_steps} consecutive such steps > "
                f"optim.max_nonfinite_steps={self.optim.max_nonfinite_steps}"
            )  # fmt: skip
            raise NonFiniteLoss(
                f"{what}; stopping ({why}). The step was not applied; the last checkpoint "
                "holds the last good weights (lower optim.lr or raise gradient_clip_val)"
            )
        log.warning("%s; skipped, not applied (%d in a row)", what, self._bad_steps)
        for p in self.parameters():
            p.grad = None
        self.log("train/skipped_steps", float(self._bad_steps))

    def _now(self) -> float:
        if self.device.type == "cuda":  # kernels run asynchronously: time what they did
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_batch_start(self, batch, batch_idx):
        self._step_start = self._now()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._step_start is None:
            return
        seconds = self._now() - self._step_start
        windows_per_step = self.trainer.world_size // self.context_parallel
        tokens = batch["input_ids"].numel() * windows_per_step
        self.log("train/tokens_per_s", tokens / seconds, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/peak_mem_gb", self._peak_memory_gb())

    def _peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    # -- validation: sums, not means ---------------------------------------------------------

    def on_validation_epoch_start(self):
        zero = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        self._nll_sum, self._tokens, self._correct = zero(), zero(), zero()

    def validation_step(self, batch: dict, batch_idx: int):
        nll, hidden, labels = self._scored(batch)
        self._nll_sum += nll.double().sum()
        self._tokens += nll.numel()
        if "distances" in batch:  # answers only: few rows, their logits are small
            predicted = (hidden @ self.model.lm_head.weight.t()).argmax(-1)
            self._correct += (predicted == labels).sum()

    def on_validation_epoch_end(self):
        reduce = lambda x: self.trainer.strategy.reduce(x, reduce_op="sum")  # noqa: E731
        nll_sum, tokens = reduce(self._nll_sum), reduce(self._tokens)
        loss = nll_sum / tokens.clamp(min=1)
        self.log("val/loss", loss.float(), sync_dist=False, prog_bar=True)
        self.log("val/ppl", loss.exp().float(), sync_dist=False, prog_bar=True)
        self.log("val/tokens", tokens.float(), sync_dist=False)
        if getattr(self.trainer.datamodule, "recall", None) is not None:
            accuracy = reduce(self._correct) / tokens.clamp(min=1)
            self.log("val/accuracy", accuracy.float(), sync_dist=False, prog_bar=True)

    # -- optimiser ---------------------------------------------------------------------------

    def configure_optimizers(self):
        o = self.optim
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": o.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
        )
        total = o.total_steps or (self.trainer.max_steps if self.trainer.max_steps > 0 else 10**9)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda step: lr_factor(
                step, o.warmup_steps, total, o.schedule, o.power, o.min_lr_ratio
            ),
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- exact resume: the RNG too ------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[FORMAT_KEY] = FORMAT
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

"""What each training step cost and ran at: the Throughput callback logs ``train/tokens_per_s``
(tokens of every window the step trained on, all ranks together), ``train/lr`` and
``train/peak_mem_gb`` (CUDA: the most memory allocated; CPU: the process's peak resident set).
"""

from __future__ import annotations

import resource
import time

import lightning as L
import torch

from lightning_modules.context_parallel import check_context_parallel


class Throughput(L.Callback):
    """``context_parallel``: ranks that share each window (they train on one window, so a
    step covers ``world_size // context_parallel`` windows per batch row)."""

    def __init__(self, context_parallel: int = 1):
        self.context_parallel = check_context_parallel(context_parallel)
        self._start: float | None = None

    @staticmethod
    def _now(device: torch.device) -> float:
        if device.type == "cuda":  # kernels run asynchronously: time what they did
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = self._now(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        seconds = self._now(pl_module.device) - self._start
        windows_per_row = trainer.world_size // self.context_parallel
        tokens = batch["input_ids"].numel() * windows_per_row
        pl_module.log("train/tokens_per_s", tokens / seconds, prog_bar=True)
        pl_module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"])
        pl_module.log("train/peak_mem_gb", peak_memory_gb(pl_module.device))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

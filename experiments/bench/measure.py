"""How every benchmark measures: time, peak memory, the machine, and training's own step.

One module, so that two benchmarks' numbers mean the same thing: a median after a warm-up,
memory as growth above what the process held before, and a training step that is the
LightningModule's (``CausalLM.training_step``: the chunked loss train.py trains with), not a
benchmark's own idea of one. No benchmark imports another.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from models.transformer import ModelConfig
from pipeline.provenance import host

# the paper's schedule (LongNet, Section 4): segment lengths and dilation rates
PAPER_W = [2048, 4096, 8192, 16384, 32768]
PAPER_R = [1, 2, 4, 6, 12]
K = 1024
RESULTS = Path(__file__).resolve().parents[1] / "results"  # experiments/results/<benchmark>/


class PeakMemory:
    """Peak memory growth (bytes) while the block runs: the CUDA allocator's peak, or on CPU
    the kernel's high-water mark of the resident set (``VmHWM``, reset on entry through
    ``/proc/self/clear_refs``), so nothing runs beside the measured call. Where the reset is
    not allowed, a thread samples the resident set every 2 ms instead (that thread shares the
    cores: time a call without this block)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.top = _rss()
        self.thread = None
        if not _reset_high_water_mark():
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.top = max(self.top, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.thread is None:
            self.peak = max(_high_water_mark(), _rss()) - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.top, _rss()) - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _reset_high_water_mark() -> bool:
    """Linux (>= 4.0): writing 5 to clear_refs sets VmHWM to the current resident set."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _high_water_mark() > 0
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return 0


def median(values) -> float:
    return statistics.median(values)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, int]:
    """Median seconds of ``repeats`` calls after one warm-up, and the peak memory growth of one
    more call measured apart: the timed calls run with nothing measuring beside them."""
    fn()
    with PeakMemory(device) as mem:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return median(times), mem.peak


def fixed_mmap_threshold() -> None:
    """glibc keeps freed blocks below a moving threshold (up to 32 MiB) in its heap, so the
    resident set would not show what a run allocates; a fixed threshold makes every tensor its
    own mapping, returned on free. Re-runs the calling script with it set (command line only)."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        command = ["-m", spec.name] if spec else [sys.argv[0]]  # python -m experiments.bench.X
        os.execve(sys.executable, [sys.executable, *command, *sys.argv[1:]], env)


def machine(device: torch.device, dtype: torch.dtype) -> dict:
    """What the numbers were measured on: they mean little without it."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **host(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
    }


# -- training's step ---------------------------------------------------------------------------


def language_model(cfg: ModelConfig, loss_chunk: int = 8192, device="cpu"):
    """The LightningModule train.py trains (``CausalLM``), built as pipeline/build.py builds
    it, on ``device``. ``loss_chunk``: tokens per chunk of the output layer and loss (a chunk
    of at least N tokens holds the whole N x vocab logits, as plain cross-entropy does)."""
    from lightning_modules.lm import CausalLM

    module = CausalLM(cfg.to_dict(), None, context_parallel=1, loss_chunk=loss_chunk)
    return module.to(device)


def window(tokens: torch.Tensor) -> dict:
    """A batch as the data module yields it: tokens ``(B, N + 1)`` give N inputs and N
    next-token labels."""
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def train_step(module, optimizer, batch: dict, dtype: torch.dtype = torch.float32) -> float:
    """One optimizer step as train.py takes it: the module's ``training_step`` (autocast to
    ``dtype`` as Lightning's mixed precision does), backward, step, zero_grad; returns the
    loss."""
    device = batch["input_ids"].device.type
    with warnings.catch_warnings():  # no Trainer here: its self.log calls warn and do nothing
        warnings.filterwarnings("ignore", message=".*self.log.*")
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

"""Progress that stays readable in a log file: when output is not a terminal, one line per
update instead of a bar redrawn with carriage returns (thousands of them in a long run)."""

from __future__ import annotations

import logging
import sys
import time

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

log = logging.getLogger("progress")


class LineProgressBar(ProgressBar):
    """Lightning's progress bar for logs: a line every ``every`` training steps and after each
    validation, with the metrics the bar would show."""

    def __init__(self, every: int = 50):
        super().__init__()
        self.every, self._enabled, self._start = max(1, int(every)), True, None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, trainer, pl_module, what: str) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        metrics = self.get_metrics(trainer, pl_module)
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in metrics.items()
            if k != "v_num"
        )
        when = "" if self._start is None else f" [{time.perf_counter() - self._start:.0f} s]"
        print(f"{what}{when} {shown}", file=sys.stderr, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if step % self.every == 0 or step == total:
            self._line(trainer, pl_module, f"step {step}/{total if total > 0 else '?'}")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._line(trainer, pl_module, f"validation at step {trainer.global_step}")


class Progress:
    """tqdm on a terminal; elsewhere a logged line every ``seconds`` (and at the end)."""

    def __init__(self, total: int, desc: str, unit: str = "tok", seconds: float = 30.0,
                 quiet: bool = False):  # fmt: skip
        self.total, self.desc, self.unit, self.seconds = total, desc, unit, seconds
        self.done, self.start, self.last, self.quiet = (
            0,
            time.perf_counter(),
            time.perf_counter(),
            quiet,
        )
        self.bar = None
        if sys.stderr.isatty() and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.quiet:
            return
        if now - self.last >= self.seconds or self.done >= self.total:
            self.last = now
            pct = 100 * self.done / max(1, self.total)
            print(f"{self.desc}: {pct:.0f}% ({self.done}/{self.total} {self.unit}), "
                  f"{now - self.start:.0f} s", file=sys.stderr, flush=True)  # fmt: skip

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

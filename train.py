"""Train a language model.

    python train.py [configs/experiment/X.yaml ...] [key=value ...]

Merges configs/default.yaml, the YAML files in order, then the overrides (see
lightning_modules/config.py). Everything is checked before training starts; outputs go to
run_dir: checkpoints/ (last.ckpt and one every checkpoint.every_n_steps), logs/ (CSV),
tensorboard/, config.yaml (resolved) and tokenizer.json. resume=auto continues a run exactly.
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from pathlib import Path

import lightning as L

from lightning_modules.build import build, write_run_files
from lightning_modules.config import load_config, run_cli, split_argv

log = logging.getLogger("train")


def train(argv: list[str]) -> L.Trainer:
    """The entry point, callable in-process (tests do): returns the fitted trainer."""
    files, overrides = split_argv(argv)
    cfg = load_config(files, overrides)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer, module, datamodule, ckpt_path = build(cfg)
    if trainer.is_global_zero:
        write_run_files(cfg, datamodule)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    elif cfg.validate_first:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        summarize(cfg, trainer, time.perf_counter() - start)
    return trainer


def summarize(cfg, trainer: L.Trainer, seconds: float) -> None:
    """One line a person reads at the end: perplexity before and after, time, outputs."""
    ppl = validation_perplexities(Path(cfg.run_dir))
    change = "not measured"
    if ppl:
        change = f"{ppl[0][1]:.1f} (step {ppl[0][0]}) -> {ppl[-1][1]:.1f} (step {ppl[-1][0]})"
    log.info(
        "trained to step %d in %.0f s; validation perplexity %s; outputs in %s",
        trainer.global_step,
        seconds,
        change if ppl else "not measured",
        cfg.run_dir,
    )


def validation_perplexities(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val/ppl) from every logged version of a run, in step order."""
    rows = []
    for f in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        with open(f, newline="") as fh:
            rows += [
                (int(r["step"]), float(r["val/ppl"]))
                for r in csv.DictReader(fh)
                if r.get("val/ppl")
            ]
    return sorted(rows)


if __name__ == "__main__":
    sys.exit(run_cli(train, sys.argv[1:]))

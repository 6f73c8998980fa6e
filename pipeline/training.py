"""Training a run, callable in-process (train.py, the studies and the tests call it)."""

from __future__ import annotations

import logging
import time

import lightning as L

from pipeline.build import build, write_run_files
from pipeline.outputs import validation_perplexities
from settings.loading import load_run_config, split_argv
from settings.schema import RunConfig

log = logging.getLogger("train")


def train(argv: list[str] | RunConfig) -> L.Trainer:
    """Trains the run that ``argv`` (YAML files and key=value overrides) or a RunConfig
    describes; returns the fitted trainer. Everything is checked before training starts."""
    cfg = argv if isinstance(argv, RunConfig) else load_run_config(*split_argv(argv))
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


def summarize(cfg: RunConfig, trainer: L.Trainer, seconds: float) -> None:
    """One line a person reads at the end: perplexity before and after, time, outputs."""
    ppl = validation_perplexities(cfg.run_dir)
    change = "not measured"
    if ppl:
        change = f"{ppl[0][1]:.1f} (step {ppl[0][0]}) -> {ppl[-1][1]:.1f} (step {ppl[-1][0]})"
    log.info(
        "trained to step %d in %.0f s; validation perplexity %s; outputs in %s",
        trainer.global_step,
        seconds,
        change,
        cfg.run_dir,
    )

"""From a checked RunConfig to the objects of a run: every check happens here, before training
starts or anything is written, so a bad run fails fast and leaves an existing run_dir intact."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from data.datamodule import LongContextDataModule
from data.token_bytes import byte_table
from lightning_modules.lm import CausalLM
from lightning_modules.nonfinite import NonFiniteGuard
from lightning_modules.throughput import Throughput
from models.positional import check_xpos_range
from models.transformer import ModelConfig, TransformerLM
from pipeline.checkpoints import AtomicCheckpointIO, StepCheckpoint, load_weights, resolve_resume
from pipeline.preemption import Preemption
from pipeline.progress import LineProgressBar
from settings.loading import ConfigError, to_yaml
from settings.schema import RunConfig

log = logging.getLogger("train")


def resolve_precision(cfg: RunConfig) -> str:
    if cfg.trainer.get("precision") is not None:
        return cfg.trainer["precision"]
    on_gpu = torch.cuda.is_available() and cfg.trainer.get("accelerator") in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu else "32-true"


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir) / "checkpoints"


def check_writable(run_dir: str) -> None:
    """A ConfigError naming ``run_dir`` if this process could not create files in it (it, or
    the nearest folder above it that exists, is not writable), found before training rather
    than at the first checkpoint. Creates nothing."""
    path = Path(run_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a writable directory" if existing == path else (
            f"cannot be created: {str(existing)!r} is not a writable directory"
        )  # fmt: skip
        raise ConfigError(f"run_dir={run_dir!r} {what}; choose another run_dir")


def model_config(cfg: RunConfig, vocab_size: int) -> ModelConfig:
    """The run's ModelConfig, its vocabulary from the tokenizer, checked against the data:
    the XPOS range at the training length, and the shapes (built on the meta device)."""
    mc = cfg.model
    if mc.vocab_size is None:
        mc = dataclasses.replace(mc, vocab_size=vocab_size)
    elif mc.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size={mc.vocab_size} does not match the tokenizer's "
            f"{vocab_size} tokens; set model.vocab_size=null to follow it"
        )
    if mc.position == "xpos":  # finite XPOS scales at the training length, or a clear error
        with torch.device("meta"):
            anchor = TransformerLM(mc).blocks[0].attn.anchor
        try:
            check_xpos_range(cfg.data.seq_len, mc.d_model // mc.n_head, mc.xpos_scale_base, anchor)
        except ValueError as err:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len} with model.attention={mc.attention}: {err}"
            ) from err
    return mc


def progress_callbacks(cfg: RunConfig) -> list:
    """Lightning's bar on a terminal; in a log file, a line per logging interval instead of
    thousands of carriage returns."""
    if sys.stderr.isatty() or cfg.trainer.get("enable_progress_bar") is False:
        return []
    return [LineProgressBar(every=cfg.trainer.get("log_every_n_steps") or 50)]


def callbacks(cfg: RunConfig) -> list[L.Callback]:
    """What a run does besides training (lightning_modules/lm.py): checkpoints, not applying a
    diverged step (optim.nonfinite), throughput logs, saving and stopping on a signal,
    progress."""
    return [
        StepCheckpoint(
            dirpath=checkpoint_dir(cfg),
            save_last=True,
            save_top_k=-1,
            every_n_train_steps=cfg.checkpoint.every_n_steps,
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            # a run's checkpoint directory is its own: a last.ckpt that Lightning did not write
            # (the preemption save) is overwritten, not kept beside a new last-v1.ckpt that
            # eval.py, init_from and resume=auto would never read
            enable_version_counter=False,
        ),
        NonFiniteGuard(cfg.optim.nonfinite, cfg.optim.max_nonfinite_steps),
        Throughput(cfg.context_parallel),
        Preemption(cfg.run_dir),
        *progress_callbacks(cfg),
    ]


def set_token_bytes(module: CausalLM, tokenizer) -> None:
    """The bytes each token covers, for ``val/bpb``: read from a byte-level BPE's token strings
    (every tokenizer this repository trains); another tokenizer given as data.tokenizer_path
    has no such table, and the run logs no val/bpb (with a warning saying why)."""
    try:
        module.set_token_bytes(byte_table(tokenizer))
    except ValueError as err:
        log.warning("no val/bpb: %s", err)


def build(cfg: RunConfig):
    """Returns (trainer, module, datamodule, ckpt_path) for ``trainer.fit``."""
    check_writable(cfg.run_dir)
    ckpt_path = resolve_resume(cfg.resume, checkpoint_dir(cfg), cfg.run_dir)
    datamodule = LongContextDataModule(cfg.data, context_parallel=cfg.context_parallel)
    datamodule.setup()  # trains the tokenizer / fills the cache once; checks the corpus
    mc = model_config(cfg, datamodule.vocab_size)
    plain = dataclasses.asdict(cfg)
    module = CausalLM(
        mc.to_dict(),
        plain["optim"],
        context_parallel=cfg.context_parallel,
        context_parallel_layout=cfg.context_parallel_layout,
        loss_chunk=cfg.loss_chunk,
        run_config=plain,
    )
    if datamodule.corpus is not None:  # a text source: val/bpb
        set_token_bytes(module, datamodule.corpus.tokenizer)
    if cfg.init_from and not ckpt_path:  # a resumed run has its own, trained weights
        step = load_weights(module, cfg.init_from)
        log.info("weights from %s (step %d); optimizer, schedule and data start afresh",
                 cfg.init_from, step)  # fmt: skip
    run_dir = Path(cfg.run_dir)
    # a new version_N per launch, so a resumed run adds its logs beside the earlier ones
    loggers = [CSVLogger(run_dir, name="logs"), TensorBoardLogger(run_dir, name="tensorboard")]
    trainer_args = {**cfg.trainer, "precision": resolve_precision(cfg)}
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=loggers,
        callbacks=callbacks(cfg),
        plugins=[AtomicCheckpointIO()],
        **trainer_args,
    )
    return trainer, module, datamodule, ckpt_path


def write_run_files(cfg: RunConfig, datamodule: LongContextDataModule) -> None:
    """The resolved config and the tokenizer, beside the checkpoints."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    datamodule.save_tokenizer(run_dir)

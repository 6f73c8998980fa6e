"""From a resolved config to the objects of a run: every check happens here, before training
starts or anything is written, so a bad run fails fast and leaves an existing run_dir intact."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from data.config import DataConfig
from data.datamodule import LongContextDataModule
from lightning_modules.config import ConfigError
from lightning_modules.lm import CausalLM
from models.positional import xpos_log_scale
from models.transformer import ModelConfig, TransformerLM


def resolve_precision(cfg: DictConfig) -> str:
    if cfg.trainer.get("precision") is not None:
        return cfg.trainer.precision
    on_gpu = torch.cuda.is_available() and cfg.trainer.get("accelerator") in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu else "32-true"


def checkpoint_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) / "checkpoints"


def resolve_resume(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from, or None; refuses to start afresh over a run's checkpoints
    (that would overwrite them)."""
    last = checkpoint_dir(cfg) / "last.ckpt"
    if cfg.resume is None:
        if last.exists():
            raise ConfigError(
                f"run_dir={cfg.run_dir!r} already holds checkpoints; pass "
                "resume=auto to continue it, or choose another run_dir"
            )
        return None
    if cfg.resume == "auto":
        return str(last) if last.exists() else None
    check_checkpoint(cfg.resume)
    return str(cfg.resume)


def check_checkpoint(path: str | Path) -> dict:
    """Loads a checkpoint's metadata, or raises naming the path and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        raise ConfigError(f"{str(path)!r} is not a PyTorch checkpoint: {err}") from err
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "model" not in hparams or "state_dict" not in ckpt:
        raise ConfigError(
            f"{str(path)!r} is not a checkpoint of this project (no model config "
            "in its hyper_parameters)"
        )
    return ckpt


def model_config(cfg: DictConfig, vocab_size: int) -> ModelConfig:
    """The ModelConfig of the run, its vocabulary from the tokenizer, checked against data."""
    raw = OmegaConf.to_container(cfg.model, resolve=True)
    if raw["vocab_size"] is None:
        raw["vocab_size"] = vocab_size
    elif raw["vocab_size"] != vocab_size:
        raise ConfigError(
            f"model.vocab_size={raw['vocab_size']} does not match the tokenizer's "
            f"{vocab_size} tokens; set model.vocab_size=null to follow it"
        )
    try:
        mc = ModelConfig.from_dict(raw)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err
    if mc.position == "xpos":  # finite XPOS scales at the training length, or a clear error
        with torch.device("meta"):
            anchor = TransformerLM(mc).blocks[0].attn.anchor
        try:
            xpos_log_scale(
                torch.arange(cfg.data.seq_len), mc.d_model // mc.n_head, mc.xpos_scale_base, anchor
            )
        except ValueError as err:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len} with model.attention={mc.attention}: {err}"
            ) from err
    return mc


def build(cfg: DictConfig):
    """Returns (trainer, module, datamodule, ckpt_path) for ``trainer.fit``."""
    try:
        data_cfg = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err
    ckpt_path = resolve_resume(cfg)
    datamodule = LongContextDataModule(data_cfg)
    datamodule.setup()  # trains the tokenizer / fills the cache once; checks the corpus
    mc = model_config(cfg, datamodule.vocab_size)
    plain = OmegaConf.to_container(cfg, resolve=True)
    module = CausalLM(mc.to_dict(), dict(plain["optim"]), run_config=plain)
    run_dir = Path(cfg.run_dir)
    callbacks = [
        ModelCheckpoint(
            dirpath=checkpoint_dir(cfg),
            save_last=True,
            save_top_k=-1,
            every_n_train_steps=cfg.checkpoint.every_n_steps,
            filename="step{step:07d}",
            auto_insert_metric_name=False,
        )
    ]
    # a new version_N per launch, so a resumed run adds its logs beside the earlier ones
    loggers = [CSVLogger(run_dir, name="logs"), TensorBoardLogger(run_dir, name="tensorboard")]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["precision"] = resolve_precision(cfg)
    trainer = L.Trainer(
        default_root_dir=run_dir, logger=loggers, callbacks=callbacks, **trainer_args
    )
    return trainer, module, datamodule, ckpt_path


def write_run_files(cfg: DictConfig, datamodule: LongContextDataModule) -> None:
    """The resolved config and the tokenizer, beside the checkpoints."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    datamodule.save_tokenizer(run_dir)

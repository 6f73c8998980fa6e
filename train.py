"""Train a language model.

    python train.py [configs/experiment/X.yaml ...] [key=value ...]

Merges configs/default.yaml, the YAML files in order, then the overrides (see
lightning_modules/config.py). Everything is checked before training starts; outputs go to
run_dir: checkpoints/ (last.ckpt and one every checkpoint.every_n_steps), logs/ (CSV),
tensorboard/, config.yaml (resolved) and tokenizer.json. resume=auto continues a run exactly.
"""

from __future__ import annotations

import logging
import sys

import lightning as L

from lightning_modules.build import build, write_run_files
from lightning_modules.config import ConfigError, load_config, split_argv

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
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        train(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a language model.

    python train.py [configs/experiment/X.yaml ...] [key=value ...] [--print-config]

Merges the schema's defaults (configs/default.yaml shows them), the YAML files in order, then
the overrides (settings/loading.py). Everything is checked before training starts; outputs go
to run_dir: checkpoints/ (last.ckpt and one every checkpoint.every_n_steps), logs/ (CSV),
tensorboard/, config.yaml (resolved) and tokenizer.json. resume=auto continues a run exactly.
"""

import sys

from pipeline.training import train
from settings.cli import run_cli
from settings.loading import load_run_config

if __name__ == "__main__":
    sys.exit(run_cli(train, sys.argv[1:], load=load_run_config))

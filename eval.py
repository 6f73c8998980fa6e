"""Perplexity as context grows, for one or more checkpoints.

    python eval.py checkpoints=[A.ckpt,B.ckpt] context_lengths=[512,1024,2048] out_dir=DIR \
        [data.source=text_dir data.path=DIR] [split=val] [key=value ...] [--print-config]

Defaults and rules: configs/eval.yaml (generated from settings/schema.py). Method:
pipeline/scoring.py (stated in every output). Writes ppl_vs_context.{csv,json,png},
prompting.{csv,png}, positions.csv, documents.csv and repeated_span.{csv,png} into out_dir
(checkpoints of data.source=recall: recall.{csv,json}, recall_accuracy.png and
recall_heatmap.png, answer accuracy by distance instead; recall_by_generation=true adds that of
answers decoded greedily, beside it), all at once at the end, so a failed run leaves an
existing out_dir untouched.
"""

import sys

from pipeline.evaluation import evaluate
from settings.cli import run_cli
from settings.loading import load_eval_config

if __name__ == "__main__":
    sys.exit(run_cli(evaluate, sys.argv[1:], load=load_eval_config))

"""The paper's Table 2: perplexity of Transformer, Sparse Transformer and LongNet by length.

    python -m experiments.paper_table2 --scale tiny     # 2 CPU cores, the stdlib corpus
    python -m experiments.paper_table2 --scale paper    # the paper's settings, for GPUs
    python -m experiments.paper_table2 --config my_study.yaml --only longnet_8192 --dry-run

The protocol (configs/study/paper_table2_<scale>.yaml): each run trains one model at one length
with the same tokens per batch (batch = tokens_per_batch / length) for the same number of
steps; LongNet runs share one dilated schedule; each Sparse Transformer's (block, summary) is
chosen at its training length so that its attention FLOPs match that schedule's
(models.attention.sparse.match_dilated); every model is then scored by eval.py at the same
lengths on the same documents. Runs live in runs/<name>/<model>_<length>/ and are skipped
once finished (see experiments/study.py); an interrupted study resumes where it stopped.

Writes runs/<name>/table.md (the table shaped like the paper's, with the paper's numbers
below it), results.json and ppl_vs_context.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments import study
from models.attention.sparse import match_dilated
from pipeline.report import line_plot, markdown_table
from settings.cli import run_cli
from settings.loading import ConfigError

MODELS = {
    "transformer": "Transformer",
    "sparse_transformer": "Sparse Transformer",
    "longnet": "LongNet",
}


def plan(spec, extra: list[str] = ()) -> list[dict]:
    """Every run of a study: name, model, seq_len, batch and its train.py argv (checked)."""
    w = [int(x) for x in spec.schedule.segment_lengths]
    r = [int(x) for x in spec.schedule.dilation_rates]
    runs = []
    for run in spec.runs:
        if run.model not in MODELS:
            raise ConfigError(f"run model {run.model!r} is not one of {sorted(MODELS)}")
        length = int(run.seq_len)
        if spec.tokens_per_batch % length:
            raise ConfigError(
                f"tokens_per_batch={spec.tokens_per_batch} is not a multiple of seq_len={length}"
            )
        batch = spec.tokens_per_batch // length
        argv = [
            str(study.ROOT / run.config),
            *spec.train,
            f"data.seq_len={length}",
            f"data.batch_size={batch}",
            f"trainer.max_steps={spec.steps}",
        ]
        if run.model == "longnet":
            argv += [f"model.segment_lengths={w}", f"model.dilation_rates={r}"]
        if run.model == "sparse_transformer":  # matched with the run's own head count
            n_head = study.resolve([*argv, *extra]).model.n_head
            block, summary = match_dilated(w, r, length, n_head)
            argv += [f"model.sparse_block={block}", f"model.sparse_summary={summary}"]
        argv += extra
        cfg = study.resolve(argv)
        study.build_on_meta(cfg)  # a config the model refuses fails here, before training
        runs.append(
            {
                "name": f"{run.model}_{length}",
                "model": run.model,
                "seq_len": length,
                "batch": batch,
                "argv": argv,
                "cfg": cfg,
            }
        )
    return runs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=["tiny", "paper"], default="tiny")
    p.add_argument("--config", help="a study YAML instead of configs/study/paper_table2_<scale>")
    study.add_arguments(p)
    a = p.parse_args(argv)
    path = a.config or study.ROOT / "configs" / "study" / f"paper_table2_{a.scale}.yaml"
    spec = study.load_study(path)
    runs = study.select(plan(spec, a.set), a.only, path)
    out = Path(a.out or study.ROOT / "runs" / spec.name)
    for r in runs:
        m = r["cfg"].model
        pattern = {
            "dilated": f"w={list(m.segment_lengths)} r={list(m.dilation_rates)}",
            "sparse": f"block={m.sparse_block} summary={m.sparse_summary}",
        }.get(m.attention, m.attention)
        study.say(f"plan: {r['name']}: batch {r['batch']} x {r['seq_len']}, {pattern}")
    if a.dry_run:
        return {}
    study.set_threads(a.threads)
    lengths = [int(n) for n in spec.eval.context_lengths]

    def score(r, run_dir):
        r["eval"] = study.ppl_by_length(study.eval_run(run_dir, lengths, list(spec.eval.args)))

    study.train_and_score(runs, out, score)
    return report(spec, runs, lengths, out)


def report(spec, runs, lengths, out: Path) -> dict:
    header = ["model", "training length", "batch", *[f"ppl @{n}" for n in lengths]]
    header += ["train s", "eval s"]
    rows = [
        [
            MODELS[r["model"]],
            r["seq_len"],
            r["batch"],
            *[r["eval"].get(n) for n in lengths],
            r["train"]["train_seconds"],
            study.eval_seconds(out / r["name"]),
        ]
        for r in runs
    ]
    steps = spec.steps
    text = [
        f"# {spec.name}: perplexity by evaluation length",
        "",
        f"{spec.tokens_per_batch} tokens per batch, {steps} steps for every model; LongNet "
        f"w={list(spec.schedule.segment_lengths)} r={list(spec.schedule.dilation_rates)}; "
        f"eval.py {' '.join(spec.eval.args)}. Measured {time.strftime('%Y-%m-%d')}.",
        "",
        markdown_table(header, rows),
    ]
    if "paper" in spec:
        paper_lengths = list(spec.paper.lengths)
        text += [
            "",
            "The paper's Table 2, for reference (its scale, not ours):",
            "",
            markdown_table(
                ["model", "training length", "batch", *[f"ppl @{n}" for n in paper_lengths]],
                [list(row) for row in spec.paper.rows],
            ),
        ]
    out.mkdir(parents=True, exist_ok=True)
    curves = {f"{MODELS[r['model']]} @{r['seq_len']}": r["eval"] for r in runs}
    line_plot(
        out / "ppl_vs_context.png",
        curves,
        "evaluation length (tokens)",
        "perplexity",
        f"{spec.name}: trained at the length after @, evaluated by eval.py",
    )
    return study.write_report(out, text, {"runs": runs, "lengths": lengths}, ["ppl_vs_context.png"])


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))

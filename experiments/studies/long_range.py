"""Which attention reaches far? Train one small model per attention on ``data.source=recall``,
then score answer accuracy against record-to-query distance.

    python -m experiments.studies.long_range            # (make longrange)
    python -m experiments.studies.long_range --quick    # dense and one LongNet, fewer steps
    python -m experiments.studies.long_range --only dense --dry-run
    python -m experiments.studies.long_range --threads 1 --shard 0/2 &   # two processes share
    python -m experiments.studies.long_range --threads 1 --shard 1/2     # 2 cores; then the table

The study YAML (``configs/study/long_range_tiny.yaml``) names the model (width, depth, heads),
the recall task, the training length and token budget, and the runs: each a list of
train.py overrides (the attention and its schedule) on top of the shared ones, all trained on
the same tokens (the same seed and stream). With a ``curriculum:`` (seq_len, steps, train
overrides) each run first trains a stage ``<run>.<seq_len>`` at that shorter length and then
starts from its weights (``init_from``): trained at 256 from the start no model learned to
copy; after the short stage dense did (experiments/README.md, section 6). Each run is then
scored by eval.py's recall path (pipeline/recall_probe.py) at every evaluation length, on
distances from 16 to the longest length, and costed by its attention FLOPs per token at the
training length (``attended_keys`` x 4 x d_model x n_layer: q.k and p.v, forward). Runs are
ranked by the *area under accuracy against log2 distance* (the mean accuracy over the distance
grid at the longest evaluation length: 1.0 reaches everything, chance reaches nothing) per
attention GFLOP per token.

Writes runs/<name>/table.md, results.json, accuracy_vs_distance.png; each run's eval/ holds
recall.csv and its heatmap. Resumable like the other studies (experiments/studies/runner.py).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

from data.recall import RecallTask
from experiments.studies import runner
from experiments.studies.runner import FinishedRun, Run, Study, checked_run
from experiments.studies.schema import LongRangeSpec
from models.transformer import attended_keys
from pipeline import outputs
from pipeline.display import line_plot, markdown_table
from settings.cli import run_cli
from settings.loading import ConfigError


def plan(spec: LongRangeSpec, extra: list[str] = (), out: Path = Path("."), args=None
         ) -> list[Run]:  # fmt: skip
    """The runs to train into ``out``, in order: with a ``curriculum`` in the study, each run's
    short stage (named ``<run>.<length>``, its ``stage`` the run's name; trained at the
    curriculum's length on the same tokens per batch) comes before the run itself, which starts
    from its weights (``init_from``; the optimizer, schedule and data start afresh)."""
    quick = bool(getattr(args, "quick", False))
    steps = spec.quick.steps if quick else spec.steps
    make = functools.partial(recall_run, spec)
    runs = []
    for name in spec.quick.runs if quick else list(spec.runs):
        shared = [str(runner.ROOT / spec.model), *spec.train, *spec.runs[name]]
        runs += runner.staged(spec, name, shared, spec.seq_len, steps, extra, out, make, quick)
    return runs


def recall_run(spec: LongRangeSpec, name: str, argv: list[str], **info) -> Run:
    run = checked_run(name, argv, **info)
    if run.cfg.data.source != "recall":
        raise ConfigError(f"run {name}: the study needs data.source=recall")
    mflop = attention_gflop(run.cfg, spec.seq_len) * 1e3
    run.summary = f"{run.cfg.model.attention} {mflop:.2f} MFLOP/token"
    return run


def score(spec: LongRangeSpec, run: Run, run_dir: Path) -> dict:
    """eval.py's recall path on a trained run (not on a curriculum stage); the last
    validation accuracy of both."""
    scores = {}
    if run.stage is None:
        lengths, args = list(spec.eval.context_lengths), list(spec.eval.args)
        out = runner.eval_run(run_dir, lengths, args, "recall.json")
        scores["recall"] = json.loads((out / "recall.json").read_text())
    return {**scores, "val_accuracy": last(outputs.metric(run_dir, "val/accuracy"))}


def area(rows: list[dict], length: int) -> float:
    """Mean accuracy over the distance grid at ``length`` (area under accuracy vs log2 d,
    divided by the grid's span in octaves; the grid is evenly spaced in log2 d)."""
    acc = [r["accuracy"] for r in rows if r["length"] == length and not r["note"]]
    return sum(acc) / len(acc) if acc else math.nan


def attention_gflop(cfg, seq_len: int) -> float:
    """Attention FLOPs per token, forward (q.k and p.v), in GFLOP."""
    m = cfg.model
    return attended_keys(m, seq_len) * 4 * m.d_model * m.n_layer / 1e9


def last(values: dict[int, float]) -> float:
    """The value at the highest step (NaN if none)."""
    return values[max(values)] if values else math.nan


def out_name(spec: LongRangeSpec, args) -> str:
    return spec.name + ("_quick" if args.quick else "")


def ranking(spec: LongRangeSpec, r: FinishedRun, stage: FinishedRun | None) -> dict:
    """A run's row facts: its cost, its areas, its stage's numbers added to its own."""
    longest, n = spec.eval.context_lengths[-1], spec.seq_len
    gflop = attention_gflop(r.run.cfg, n)
    covered = area(r.scores["recall"], longest)
    return {
        "attention": r.run.cfg.model.attention,
        "train_seconds": r.train["train_seconds"] + (stage.train["train_seconds"] if stage else 0),
        "stage_val_accuracy": stage.scores["val_accuracy"] if stage else None,
        "area": covered,
        "area_train_len": area(r.scores["recall"], n),
        "gflop": gflop,
        "area_per_gflop": covered / gflop if gflop else math.nan,
    }


def finish(spec: LongRangeSpec, results: list[FinishedRun], out: Path, args) -> dict:
    stages = {r.run.stage: r for r in results if r.run.stage}
    rows = [r.row(**ranking(spec, r, stages.get(r.name))) for r in results if not r.run.stage]
    ranked = sorted(rows, key=lambda r: runner.finite_or_inf(-r["area_per_gflop"]))  # best first
    first = next(r.run.cfg for r in results if not r.run.stage)
    return report(spec, ranked, list(stages.values()), first, out, out_name(spec, args))


def report(spec: LongRangeSpec, ranked: list[dict], stages: list[FinishedRun], cfg, out: Path,
           name: str) -> dict:  # fmt: skip
    lengths, n = list(spec.eval.context_lengths), spec.seq_len
    longest = lengths[-1]
    seconds = sum(r["train_seconds"] for r in ranked)
    dists = sorted({x["distance"] for r in ranked for x in r["recall"] if x["length"] == longest})
    header = ["rank", "run", "attention", "attn MFLOP/token", "train s", "val acc", f"area @{n}",
              f"area @{longest}", "area per GFLOP"] + [f"d={d}" for d in dists]  # fmt: skip
    curves, rows = {}, []
    for i, r in enumerate(ranked, 1):
        curves[r["name"]] = {x["distance"]: x["accuracy"] for x in r["recall"]
                             if x["length"] == longest}  # fmt: skip
        rows.append([i, r["name"], r["attention"], r["gflop"] * 1e3, r["train_seconds"],
                     r["val_accuracy"], r["area_train_len"], r["area"], r["area_per_gflop"],
                     *[curves[r["name"]].get(d) for d in dists]])  # fmt: skip
    task = RecallTask.of(cfg.data)
    guess = ", ".join(f"1/{task.records_at(L)} at {L}" for L in lengths)
    text = [
        f"# {name}: answer accuracy by distance, ranked by area per attention FLOP",
        "",
        f"Trained at {n} tokens for {cfg.trainer.get('max_steps')} steps of "
        f"{spec.tokens_per_batch} tokens on data.source=recall"
        f"{runner.curriculum_text(spec, stages)}; "
        f"accuracy at L={longest} over "
        f"distances {dists[0]}..{dists[-1]} (area: the mean over the log2 grid). Training "
        f"took {seconds:.0f} s in all. Measured {time.strftime('%Y-%m-%d')}. Picking one of "
        f"the sequence's values at random scores about 1/records: {guess}.",
        "",
        markdown_table(header, rows),
    ]
    out.mkdir(parents=True, exist_ok=True)
    line_plot(out / "accuracy_vs_distance.png", curves, "record-to-query distance (tokens)",
              "answer accuracy", f"{name}: trained at {n}, scored at {longest}")  # fmt: skip
    return runner.write_report(out, text, {"runs": ranked}, ["accuracy_vs_distance.png"])


def options(p) -> None:
    p.add_argument("--quick", action="store_true", help="the YAML's quick: runs and steps")


STUDY = Study(
    doc=__doc__,
    schema=LongRangeSpec,
    default_config=lambda a: runner.ROOT / "configs" / "study" / "long_range_tiny.yaml",
    plan=plan,
    score=score,
    finish=finish,
    options=options,
    out_name=out_name,
)


def main(argv: list[str] | None = None) -> dict:
    return runner.main(STUDY, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))

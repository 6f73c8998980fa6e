"""Which attention reaches far? Train one small model per attention on ``data.source=recall``,
then score answer accuracy against record-to-query distance.

    python -m experiments.long_range                      # (make longrange)
    python -m experiments.long_range --quick              # dense and one LongNet, fewer steps
    python -m experiments.long_range --only dense --dry-run
    python -m experiments.long_range --threads 1 --shard 0/2 &   # two processes share 2 cores
    python -m experiments.long_range --threads 1 --shard 1/2     # (then once more: the table)

The study YAML (``configs/study/long_range_tiny.yaml``) names the model (width, depth, heads),
the recall layout, the training length and token budget, and the runs: each a list of
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
recall.csv and its heatmap. Resumable like the other studies (experiments/study.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from data.recall import Layout
from experiments import study
from models.transformer import attended_keys
from pipeline import outputs
from pipeline.evaluation import evaluate
from pipeline.report import line_plot, markdown_table
from settings.cli import run_cli
from settings.loading import ConfigError


def plan(spec, out: Path, extra: list[str] = (), quick: bool = False) -> list[dict]:
    """The runs to train into ``out``, in order: with a ``curriculum`` in the study, each run's
    short stage (named ``<run>.<length>``, its ``stage`` the run's name; trained at the
    curriculum's length on the same tokens per batch) comes before the run itself, which starts
    from its weights (``init_from``; the optimizer, schedule and data start afresh)."""
    length, per = int(spec.seq_len), int(spec.tokens_per_batch)
    if per % length:
        raise ConfigError(f"tokens_per_batch={per} is not a multiple of seq_len={length}")
    steps = int(spec.quick.steps if quick else spec.steps)
    names = list(spec.quick.runs) if quick else list(spec.runs)
    stage = spec.get("curriculum")
    if stage is not None and per % int(stage.seq_len):
        raise ConfigError(
            f"tokens_per_batch={per} is not a multiple of curriculum.seq_len={stage.seq_len}"
        )
    runs = []

    def add(name: str, argv: list[str], **info) -> None:
        cfg = study.resolve(argv)
        if cfg.data.source != "recall":
            raise ConfigError(f"run {name}: the study needs data.source=recall")
        study.build_on_meta(cfg)
        runs.append({"name": name, "argv": argv, "cfg": cfg, **info})

    for name in names:
        if name not in spec.runs:
            raise ConfigError(f"quick.runs names {name!r}, not one of {list(spec.runs)}")
        shared = [str(study.ROOT / spec.model), *spec.train, *spec.runs[name]]
        init = []
        if stage is not None:
            short = int(stage.seq_len)
            stage_steps = int(stage.get("quick_steps", stage.steps) if quick else stage.steps)
            warm = f"{name}.{short}"
            add(warm, [*shared, f"data.seq_len={short}", f"data.batch_size={per // short}",
                       f"trainer.max_steps={stage_steps}", *stage.get("train", []), *extra],
                stage=name)  # fmt: skip
            init = [f"init_from={out / warm / 'checkpoints' / 'last.ckpt'}"]
        add(name, [*shared, f"data.seq_len={length}", f"data.batch_size={per // length}",
                   f"trainer.max_steps={steps}", *init, *extra])  # fmt: skip
    return runs


def recall_eval(run_dir: Path, lengths: list[int], args: list[str]) -> list[dict]:
    """eval.py's recall path on a run's last checkpoint into ``<run>/eval`` unless there."""
    out = run_dir / "eval"
    if (out / "recall.json").exists():
        study.say(f"{run_dir.name}: evaluated before, skipped")
    else:
        study.say(f"{run_dir.name}: scoring recall at {lengths}")
        evaluate([f"checkpoints=[{run_dir / 'checkpoints' / 'last.ckpt'}]",
                  f"context_lengths=[{','.join(map(str, lengths))}]", f"out_dir={out}",
                  *args])  # fmt: skip
    return json.loads((out / "recall.json").read_text())


def area(rows: list[dict], length: int) -> float:
    """Mean accuracy over the distance grid at ``length`` (area under accuracy vs log2 d,
    divided by the grid's span in octaves; the grid is evenly spaced in log2 d)."""
    acc = [r["accuracy"] for r in rows if r["length"] == length and not r["note"]]
    return sum(acc) / len(acc) if acc else math.nan


def attention_gflop(cfg, seq_len: int) -> float:
    """Attention FLOPs per token, forward (q.k and p.v), in GFLOP."""
    m = cfg.model
    return attended_keys(m, seq_len) * 4 * m.d_model * m.n_layer / 1e9


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(study.ROOT / "configs/study/long_range_tiny.yaml"))
    p.add_argument("--quick", action="store_true", help="the YAML's quick: runs and steps")
    p.add_argument("--shard", metavar="I/N", help="only every N-th run from the I-th (0-based): "
                   "N processes of --threads 1 share the cores (make longrange)")  # fmt: skip
    study.add_arguments(p)
    a = p.parse_args(argv)
    spec = study.load_study(a.config)
    name = spec.name + ("_quick" if a.quick else "")
    out = Path(a.out or study.ROOT / "runs" / name)
    runs = plan(spec, out, a.set, a.quick)
    wanted = [r["name"] for r in study.select(runs, a.only, a.config) if not r.get("stage")]
    if a.shard:
        wanted = wanted[shard(a.shard)]
    runs = [r for r in runs if r.get("stage", r["name"]) in wanted]  # stages go with their run
    for r in runs:
        mflop = attention_gflop(r["cfg"], int(spec.seq_len)) * 1e3
        study.say(f"plan: {r['name']}: {r['cfg'].model.attention} {mflop:.2f} MFLOP/token")
    if a.dry_run:
        return {}
    study.set_threads(a.threads)
    lengths = [int(n) for n in spec.eval.context_lengths]

    def score(r, run_dir):
        if not r.get("stage"):
            r["recall"] = recall_eval(run_dir, lengths, list(spec.eval.args))
        r["val_accuracy"] = last(outputs.metric(run_dir, "val/accuracy"))

    study.train_and_score(runs, out, score)
    return report(spec, runs, lengths, out, name)


def curriculum_text(spec, stages: list[dict]) -> str:
    """How the curriculum stages trained, for the table's caption ('' without any)."""
    if not stages:
        return ""
    steps = ", ".join(str(s) for s in sorted({r["cfg"].trainer.get("max_steps") for r in stages}))
    overrides = " ".join(spec.curriculum.get("train", []))
    return (f", each after {steps} steps at {spec.curriculum.seq_len} tokens ({overrides}) "
            "whose weights it starts from")  # fmt: skip


def last(values: dict[int, float]) -> float:
    """The value at the highest step (NaN if none)."""
    return values[max(values)] if values else math.nan


def shard(text: str) -> slice:
    """``I/N`` -> the slice of every N-th run from the I-th; a ConfigError if malformed."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return slice(i, None, n)


def report(spec, runs, lengths, out: Path, name: str) -> dict:
    longest, n = lengths[-1], int(spec.seq_len)
    seconds = sum(r["train"]["train_seconds"] for r in runs)
    stage_runs = [r for r in runs if r.get("stage")]
    stages = {r["stage"]: r for r in stage_runs}
    runs = [r for r in runs if not r.get("stage")]
    for r in runs:
        stage = stages.get(r["name"])
        r["train_seconds"] = r["train"]["train_seconds"] + (
            stage["train"]["train_seconds"] if stage else 0
        )
        r["stage_val_accuracy"] = stage["val_accuracy"] if stage else None
        r["area"] = area(r["recall"], longest)
        r["area_train_len"] = area(r["recall"], n)
        r["gflop"] = attention_gflop(r["cfg"], n)
        r["area_per_gflop"] = r["area"] / r["gflop"] if r["gflop"] else math.nan
    ranked = sorted(runs, key=lambda r: study.finite_or_inf(-r["area_per_gflop"]))  # best first
    dists = sorted({x["distance"] for r in runs for x in r["recall"] if x["length"] == longest})
    header = ["rank", "run", "attention", "attn MFLOP/token", "train s", "val acc", f"area @{n}",
              f"area @{longest}", "area per GFLOP"] + [f"d={d}" for d in dists]  # fmt: skip
    rows = []
    for i, r in enumerate(ranked, 1):
        acc = {x["distance"]: x["accuracy"] for x in r["recall"] if x["length"] == longest}
        rows.append([i, r["name"], r["cfg"].model.attention, r["gflop"] * 1e3, r["train_seconds"],
                     r["val_accuracy"], r["area_train_len"], r["area"], r["area_per_gflop"],
                     *[acc.get(d) for d in dists]])  # fmt: skip
    layout = Layout.of(runs[0]["cfg"].data)
    guess = ", ".join(f"1/{layout.records_at(L)} at {L}" for L in lengths)
    text = [
        f"# {name}: answer accuracy by distance, ranked by area per attention FLOP",
        "",
        f"Trained at {n} tokens for {runs[0]['cfg'].trainer.get('max_steps')} steps of "
        f"{spec.tokens_per_batch} tokens on data.source=recall{curriculum_text(spec, stage_runs)}; "
        f"accuracy at L={longest} over "
        f"distances {dists[0]}..{dists[-1]} (area: the mean over the log2 grid). Training "
        f"took {seconds:.0f} s in all. Measured {time.strftime('%Y-%m-%d')}. Picking one of "
        f"the sequence's values at random scores about 1/records: {guess}.",
        "",
        markdown_table(header, rows),
    ]
    out.mkdir(parents=True, exist_ok=True)
    curves = {r["name"]: {x["distance"]: x["accuracy"] for x in r["recall"]
                          if x["length"] == longest} for r in runs}  # fmt: skip
    line_plot(out / "accuracy_vs_distance.png", curves, "record-to-query distance (tokens)",
              "answer accuracy", f"{name}: trained at {n}, scored at {longest}")  # fmt: skip
    results = {"runs": [{k: v for k, v in r.items() if k != "cfg"} for r in ranked]}
    return study.write_report(out, text, results, ["accuracy_vs_distance.png"])


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))

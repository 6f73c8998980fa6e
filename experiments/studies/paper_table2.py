"""The paper's Table 2: perplexity of Transformer, Sparse Transformer and LongNet by length.

    python -m experiments.studies.paper_table2 --scale tiny     # 2 CPU cores, the stdlib corpus
    python -m experiments.studies.paper_table2 --scale paper    # the paper's settings, for GPUs
    python -m experiments.studies.paper_table2 --config my_study.yaml --only longnet_8192 --dry-run

The protocol (configs/study/paper_table2_<scale>.yaml, keys in
experiments/studies/schema.py): each run trains one model at one length
with the same tokens per batch (batch = tokens_per_batch / length) for the same number of
steps; LongNet runs share one dilated schedule; each Sparse Transformer's (block, summary) is
chosen at its training length so that its attention FLOPs match that schedule's
(models.attention.sparse.match_dilated); every model is then scored by eval.py at the same
lengths on the same documents. Runs live in runs/<name>/<model>_<length>/ and are skipped
once finished (see experiments/studies/runner.py); an interrupted study resumes where it stopped.

Writes runs/<name>/table.md (the table shaped like the paper's, with the paper's numbers
below it), results.json and ppl_vs_context.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from experiments.studies import runner
from experiments.studies.runner import FinishedRun, Run, Study
from experiments.studies.schema import TABLE2_MODELS as MODELS
from experiments.studies.schema import Table2Spec
from models.attention.sparse import match_dilated
from models.transformer import attended_keys
from pipeline import outputs
from pipeline.display import line_plot, markdown_table
from settings.cli import run_cli


def plan(spec: Table2Spec, extra: list[str] = (), out=None, args=None) -> list[Run]:
    """Every run of a study: name, model, seq_len, batch and its train.py argv (checked),
    each after its curriculum stage if the study has one (runner.staged)."""
    w, r = list(spec.schedule.segment_lengths), list(spec.schedule.dilation_rates)
    out = Path(out) if out is not None else runner.ROOT / "runs" / spec.name
    runs = []
    for run in spec.runs:
        batch = spec.tokens_per_batch // run.seq_len
        argv = [str(runner.ROOT / run.config), *spec.train]
        if run.model == "longnet":
            argv += [f"model.segment_lengths={w}", f"model.dilation_rates={r}"]
        if run.model == "sparse_transformer":  # matched with the run's own head count
            n_head = runner.resolve([*argv, *extra]).model.n_head
            block, summary = match_dilated(w, r, run.seq_len, n_head)
            argv += [f"model.sparse_block={block}", f"model.sparse_summary={summary}"]
        facts = {"model": run.model, "seq_len": run.seq_len, "batch": batch}
        first = f"{spec.runs[0].model}_{spec.runs[0].seq_len}"
        runs += runner.staged(spec, f"{run.model}_{run.seq_len}", argv, run.seq_len, spec.steps,
                              extra, out, first=first, facts=facts)  # fmt: skip
    for run in runs:
        m = run.cfg.model
        run.summary = f"batch {run.cfg.data.batch_size} x {run.cfg.data.seq_len}, " + {
            "dilated": f"w={list(m.segment_lengths)} r={list(m.dilation_rates)}",
            "sparse": f"block={m.sparse_block} summary={m.sparse_summary}",
        }.get(m.attention, m.attention)
    return runs


def score(spec: Table2Spec, run: Run, run_dir: Path) -> dict:
    """eval.py on a trained run (a curriculum stage is not evaluated)."""
    if run.stage:
        return {}
    ppl = runner.ppl_by_length(run_dir, spec)  # evaluates first
    return {"eval": ppl, "span": outputs.span_drops(run_dir / "eval"),
            "prompting": outputs.prompting(run_dir / "eval")}  # fmt: skip


def attention_tflop(spec: Table2Spec, r: FinishedRun) -> float:
    """Attention FLOPs a run spent training at its own length (q.k and p.v, forward and
    backward: 12 x d_model x layers per attended key per token; its short stage not
    counted), in TFLOP: the cost Figure 6 of the paper puts on its x-axis."""
    m, n = r.run.cfg.model, r.run.facts["seq_len"]
    tokens = r.train["steps"] * spec.tokens_per_batch
    return 12 * m.n_layer * m.d_model * attended_keys(m, n) * tokens / 1e12


def finish(spec: Table2Spec, results: list[FinishedRun], out: Path, args=None) -> dict:
    stages = [r for r in results if r.run.stage]
    results = runner.without_stages(results)
    lengths = list(spec.eval.context_lengths)
    dists = sorted({d for r in results for d in r.scores.get("span", {})})
    header = ["model", "training length", "batch", *[f"ppl @{n}" for n in lengths]]
    header += [f"span drop d={d}" for d in dists] + ["attn TFLOP", "train s", "eval s"]
    rows = [
        [MODELS[r.run.facts["model"]], r.run.facts["seq_len"], r.run.facts["batch"],
         *[r.scores["eval"].get(n) for n in lengths],
         *[r.scores.get("span", {}).get(d) for d in dists], attention_tflop(spec, r),
         r.train["train_seconds"],
         runner.eval_seconds(out / r.name)]
        for r in results
    ]  # fmt: skip
    w, r = list(spec.schedule.segment_lengths), list(spec.schedule.dilation_rates)
    text = [
        f"# {spec.name}: perplexity by evaluation length",
        "",
        f"{spec.tokens_per_batch} tokens per batch, {spec.steps} steps for every model"
        f"{runner.curriculum_text(spec, stages)}"
        f"{'' if not stages or spec.curriculum.shared else ' (train s: both)'}; LongNet "
        f"w={w} r={r}; eval.py {' '.join(spec.eval.args)}. Span drop: the repeated-span "
        f"probe's NLL drop (nats per token) with a copy d tokens back, at the longest length. "
        f"Measured {time.strftime('%Y-%m-%d')}.",
        "",
        markdown_table(header, rows),
    ]
    if spec.paper is not None:
        paper = ["model", "training length", "batch", *[f"ppl @{n}" for n in spec.paper.lengths]]
        text += ["", "The paper's Table 2, for reference (its scale, not ours):", "",
                 markdown_table(paper, spec.paper.rows)]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    curves = {f"{MODELS[r.run.facts['model']]} @{r.run.facts['seq_len']}": r.scores["eval"]
              for r in results}  # fmt: skip
    line_plot(out / "ppl_vs_context.png", curves, "evaluation length (tokens)", "perplexity",
              f"{spec.name}: trained at the length after @, evaluated by eval.py")  # fmt: skip
    prompting = {k: r.scores.get("prompting", {}) for k, r in zip(curves, results, strict=True)}
    plots = ["ppl_vs_context.png"]
    if any(prompting.values()):  # the paper's Figure 7b, for the same checkpoints
        line_plot(out / "prompting.png", prompting, "prompt length (tokens)",
                  "mean NLL of the same final tokens", f"{spec.name}: prompting curve")  # fmt: skip
        plots.append("prompting.png")
    results_json = {
        "runs": [r.row(attn_tflop=attention_tflop(spec, r)) for r in results],
        "lengths": lengths,
    }
    return runner.write_report(out, text, results_json, plots)


def options(p) -> None:
    p.add_argument("--scale", choices=["recipe", "tiny", "paper"], default="recipe",
                   help="configs/study/paper_table2_<scale>.yaml, without --config")  # fmt: skip


STUDY = Study(
    doc=__doc__,
    schema=Table2Spec,
    default_config=lambda a: runner.ROOT / "configs" / "study" / f"paper_table2_{a.scale}.yaml",
    plan=plan,
    score=score,
    finish=finish,
    options=options,
)


def main(argv: list[str] | None = None) -> dict:
    return runner.main(STUDY, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))

"""Does masking documents help? The tiny LongNet trained on the same tokens with and without
document masks (issue #26), scored by perplexity against context length.

    python -m experiments.studies.document_mask --threads 1 --shard 0/2 &   # two processes share
    python -m experiments.studies.document_mask --threads 1 --shard 1/2     # 2 cores (make
    python -m experiments.studies.document_mask                             # documents), table

The study YAML (``configs/study/document_mask_recipe.yaml``) names the model, the copying
recipe (experiments/README.md section 7), the training length and token budget, and the runs:
each a list of train.py overrides on top of the shared ones (``data.document_mask=true`` or
not). Both start from one shared dense stage at 64 tokens (``curriculum.shared``) and train on
the same windows in the same order (same seed and stream): they differ only in what a query may
attend at length. eval.py then scores each at every context length on the same documents, each
window inside one document (its default): what the mask changes is whether training taught
the model to use a long context of its own document or to cope with a previous, unrelated one.
Writes runs/<name>/table.md, results.json and ppl_vs_context.png.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from experiments.studies import runner
from experiments.studies.runner import FinishedRun, Run, Study
from experiments.studies.schema import StudySpec, _multiple
from pipeline.display import line_plot, markdown_table
from settings.cli import run_cli


@dataclass
class DocumentMaskSpec(StudySpec):
    model: str = MISSING  # the model YAML under every run
    seq_len: int = MISSING  # the training length
    runs: dict[str, list[str]] = MISSING  # name -> train.py overrides on top of `train`

    def __post_init__(self):
        super().__post_init__()
        _multiple(self.tokens_per_batch, self.seq_len)


def plan(spec: DocumentMaskSpec, extra: list[str] = (), out=None, args=None) -> list[Run]:
    """One run per entry of ``runs``, each after the shared stage (runner.staged)."""
    out = Path(out) if out is not None else runner.ROOT / "runs" / spec.name
    runs, first = [], next(iter(spec.runs))
    for name, overrides in spec.runs.items():
        argv = [str(runner.ROOT / spec.model), *spec.train, *overrides]
        masked = any(o.replace(" ", "") == "data.document_mask=true" for o in overrides)
        runs += runner.staged(spec, name, argv, spec.seq_len, spec.steps, extra, out, first=first,
                              summary=f"document_mask={str(masked).lower()}",
                              facts={"document_mask": masked})  # fmt: skip
    return runs


def score(spec: DocumentMaskSpec, run: Run, run_dir: Path) -> dict:
    if run.stage:  # the shared stage is not evaluated
        return {}
    return {"eval": runner.ppl_by_length(run_dir, spec)}


def finish(spec: DocumentMaskSpec, results: list[FinishedRun], out: Path, args=None) -> dict:
    stages = [r for r in results if r.run.stage]
    rows = [r.row() for r in results if not r.run.stage]
    lengths = list(spec.eval.context_lengths)
    header = ["run", "document_mask", "train s", "val ppl (last)"] + [f"ppl @{n}" for n in lengths]
    body = [[r["name"], r["document_mask"], r["train"]["train_seconds"], r["train"]["val_ppl"],
             *[r["eval"].get(n) for n in lengths]] for r in rows]  # fmt: skip
    seconds = sum(r["train"]["train_seconds"] for r in rows)
    text = [
        f"# {spec.name}: perplexity by context length, with and without document masks",
        "",
        f"The same LongNet trained at {spec.seq_len} tokens for {spec.steps} steps of "
        f"{spec.tokens_per_batch} tokens on the same windows{runner.curriculum_text(spec, stages)}"
        f", with and without `data.document_mask`; scored by eval.py ({' '.join(spec.eval.args)})"
        f", every window inside one document. Training took {seconds:.0f} s for the runs. "
        f"Measured {time.strftime('%Y-%m-%d')}.",
        "",
        markdown_table(header, body),
    ]
    out.mkdir(parents=True, exist_ok=True)
    curves = {r["name"]: r["eval"] for r in rows}
    line_plot(out / "ppl_vs_context.png", curves, "context length (tokens)", "perplexity",
              f"{spec.name}: trained at {spec.seq_len}")  # fmt: skip
    return runner.write_report(out, text, {"runs": rows}, ["ppl_vs_context.png"])


STUDY = Study(
    doc=__doc__,
    schema=DocumentMaskSpec,
    default_config=lambda a: runner.ROOT / "configs" / "study" / "document_mask_recipe.yaml",
    plan=plan,
    score=score,
    finish=finish,
)


def main(argv: list[str] | None = None) -> dict:
    return runner.main(STUDY, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))

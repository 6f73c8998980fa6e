"""Which dilation schedule? Train each of a grid for the same tokens, score and time them.

    python -m experiments.studies.ablate_dilation --config configs/study/ablate_dilation_tiny.yaml
    python -m experiments.studies.ablate_dilation --config ... --only w0=128_ratio=2 --dry-run

The study YAML names one model config, one training length and token budget, and the
schedules: a grid over (w0, ratio, reach, drop_largest) of geometric schedules (the paper's
Section 2.2: w_i = w0 * ratio^i and r_i = ratio^i, pairs until w reaches ``reach``, then the
``drop_largest`` largest pairs removed), plus any named schedules. Each schedule trains the
same model for the same number of steps (runs/<name>/<schedule>/, skipped once finished, see
experiments/studies/runner.py), then:

- eval.py: perplexity at each evaluation length and the prompting curve (mean NLL of the same
  final tokens given a growing prompt);
- the attention benchmark: forward + backward of dilated attention alone at ``bench.seq_len``
  with the model's heads, median of ``bench.repeats``, as milliseconds per 1K tokens, and the
  exact number of keys each query attends (the FLOP count, machine independent).

Writes runs/<name>/table.md (schedules ranked by perplexity at the longest length, cost beside
it), results.json, ppl_vs_context.png and prompting.png.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import torch

from experiments.bench.measure import timed
from experiments.studies import runner
from experiments.studies.runner import FinishedRun, Run, Study
from experiments.studies.schema import AblationSpec
from models.attention.dilated import dilated_attention, validate_schedule
from models.attention.sparse import dilated_keys_per_query
from pipeline import outputs
from pipeline.display import line_plot, markdown_table
from settings.cli import run_cli
from settings.loading import ConfigError


def geometric(w0: int, ratio: int, reach: int, drop_largest: int = 0) -> tuple[list, list]:
    """(segment_lengths, dilation_rates) of a geometric schedule; see the module docstring."""
    for name, value, low in (("w0", w0, 1), ("ratio", ratio, 2), ("reach", reach, 1)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    w, r = [w0], [1]
    while w[-1] < reach:
        w.append(w[-1] * ratio)
        r.append(r[-1] * ratio)
    if not 0 <= drop_largest < len(w):
        raise ConfigError(
            f"drop_largest={drop_largest} must be in 0..{len(w) - 1} for w0={w0}, ratio={ratio}, "
            f"reach={reach} (segments {w})"
        )
    keep = len(w) - drop_largest
    return w[:keep], r[:keep]


def schedules(spec: AblationSpec) -> dict[str, tuple[list, list]]:
    """Name -> (w, r) for the grid's combinations and the named schedules, checked."""
    out = {}
    grid = spec.grid
    if grid is not None:
        for w0, ratio, reach, drop in itertools.product(
            grid.w0, grid.ratio, grid.reach, grid.drop_largest
        ):
            name = f"w0={w0}_ratio={ratio}" + (f"_drop={drop}" if drop else "")
            if len(grid.reach) > 1:
                name += f"_reach={reach}"
            out[name] = geometric(w0, ratio, reach, drop)
    for name, s in spec.schedules.items():
        out[name] = (list(s.segment_lengths), list(s.dilation_rates))
    for name, (w, r) in out.items():
        try:
            validate_schedule(w, r)
        except ValueError as err:
            raise ConfigError(f"schedule {name}: {err}") from err
    return out


def plan(spec: AblationSpec, extra: list[str] = (), out=None, args=None) -> list[Run]:
    """One run per schedule, the same model, length and tokens (checked), each after its
    curriculum stage if the study has one (runner.staged)."""
    out = Path(out) if out is not None else runner.ROOT / "runs" / spec.name
    runs, named = [], schedules(spec)
    for name, (w, r) in named.items():
        argv = [str(runner.ROOT / spec.model), *spec.train, "model.attention=dilated",
                f"model.segment_lengths={w}", f"model.dilation_rates={r}"]  # fmt: skip
        runs += runner.staged(spec, name, argv, spec.seq_len, spec.steps, extra, out,
                              first=next(iter(named)), summary=f"w={w} r={r}",
                              facts={"w": w, "r": r})  # fmt: skip
    return runs


def score(spec: AblationSpec, run: Run, run_dir: Path) -> dict:
    if run.stage:  # a curriculum stage is not evaluated
        return {}
    ppl = runner.ppl_by_length(run_dir, spec)  # evaluates first: the prompting curve is its
    return {"eval": ppl, "prompting": outputs.prompting(run_dir / "eval")}


def attention_ms_per_1k(w, r, n: int, heads: int, head_dim: int, repeats: int) -> float:
    """Median forward + backward time of dilated attention alone, in ms per 1K tokens."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (
        torch.randn(1, n, heads, head_dim, generator=gen).to(device).requires_grad_()
        for _ in range(3)
    )
    seconds, _ = timed(
        lambda: dilated_attention(q, k, v, w, r, causal=True).sum().backward(), device, repeats
    )
    return 1000 * seconds / (n / 1024)


def cost(spec: AblationSpec, run: Run) -> dict:
    """What a schedule costs: keys per query (exact) and its attention's time alone."""
    m, w, r = run.cfg.model, run.facts["w"], run.facts["r"]
    return {
        "keys_per_query": dilated_keys_per_query(w, r, spec.seq_len, m.n_head),
        "attn_ms_per_1k": attention_ms_per_1k(
            w, r, spec.bench.seq_len, m.n_head, m.d_model // m.n_head, spec.bench.repeats
        ),
    }


def finish(spec: AblationSpec, results: list[FinishedRun], out: Path, args=None) -> dict:
    """Costs every schedule (after training: the benchmark wants a quiet process), then the
    table."""
    stages = [r for r in results if r.run.stage]
    rows = [r.row(**cost(spec, r.run)) for r in runner.without_stages(results)]
    return report(spec, rows, out, runner.curriculum_text(spec, stages))


def report(spec: AblationSpec, runs: list[dict], out: Path, curriculum: str = "") -> dict:
    lengths = list(spec.eval.context_lengths)
    longest = lengths[-1]
    ranked = sorted(runs, key=lambda r: runner.finite_or_inf(r["eval"].get(longest)))
    prompts = sorted({p for r in runs for p in r["prompting"]})
    header = ["rank", "schedule", "w", "r", f"keys/query @{spec.seq_len}"]
    header += [f"attn ms/1K tok @{spec.bench.seq_len}", "val ppl"]
    header += [f"ppl @{n}" for n in lengths]
    if prompts:
        header += [f"suffix NLL, prompt {prompts[0]}", f"suffix NLL, prompt {prompts[-1]}"]
    rows = []
    for i, r in enumerate(ranked, 1):
        row = [i, r["name"], r["w"], r["r"], round(r["keys_per_query"], 1), r["attn_ms_per_1k"]]
        row += [r["train"]["val_ppl"], *[r["eval"].get(n) for n in lengths]]
        if prompts:
            row += [r["prompting"].get(prompts[0]), r["prompting"].get(prompts[-1])]
        rows.append(row)
    seconds = sum(r["train"]["train_seconds"] for r in runs)
    text = [
        f"# {spec.name}: dilation schedules ranked by perplexity at {longest}",
        "",
        f"{spec.model}, trained at {spec.seq_len} for {spec.steps} steps of "
        f"{spec.tokens_per_batch} tokens each{curriculum}; eval.py "
        f"{' '.join(spec.eval.args)}; attention "
        f"forward+backward alone at {spec.bench.seq_len}, median of {spec.bench.repeats}. "
        f"Training took {seconds:.0f} s in all. Measured {time.strftime('%Y-%m-%d')}.",
        "",
        markdown_table(header, rows),
    ]
    out.mkdir(parents=True, exist_ok=True)
    line_plot(
        out / "ppl_vs_context.png",
        {r["name"]: r["eval"] for r in runs},
        "evaluation length (tokens)",
        "perplexity",
        f"{spec.name}: trained at {spec.seq_len}",
    )
    line_plot(out / "prompting.png", {r["name"]: r["prompting"] for r in runs},
              "prompt length (tokens)", "mean NLL of the same final tokens",
              f"{spec.name}: prompting curve")  # fmt: skip
    return runner.write_report(out, text, {"runs": ranked}, ["ppl_vs_context.png", "prompting.png"])


STUDY = Study(
    doc=__doc__,
    schema=AblationSpec,
    default_config=lambda a: runner.ROOT / "configs" / "study" / "ablate_dilation_tiny.yaml",
    plan=plan,
    score=score,
    finish=finish,
)


def main(argv: list[str] | None = None) -> dict:
    return runner.main(STUDY, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))

"""Which dilation schedule? Train each of a grid for the same tokens, score and time them.

    python -m experiments.ablate_dilation --config configs/study/ablate_dilation_tiny.yaml
    python -m experiments.ablate_dilation --config ... --only w0=128_ratio=2 --dry-run

The study YAML names one model config, one training length and token budget, and the
schedules: a grid over (w0, ratio, reach, drop_largest) of geometric schedules (the paper's
Section 2.2: w_i = w0 * ratio^i and r_i = ratio^i, pairs until w reaches ``reach``, then the
``drop_largest`` largest pairs removed), plus any named schedules. Each schedule trains the
same model for the same number of steps (runs/<name>/<schedule>/, skipped once finished, see
experiments/study.py), then:

- eval.py: perplexity at each evaluation length and the prompting curve (mean NLL of the same
  final tokens given a growing prompt);
- the attention benchmark: forward + backward of dilated attention alone at ``bench.seq_len``
  with the model's heads, median of ``bench.repeats``, as milliseconds per 1K tokens, and the
  exact number of keys each query attends (the FLOP count, machine independent).

Writes runs/<name>/table.md (schedules ranked by perplexity at the longest length, cost beside
it), results.json, ppl_vs_context.png and prompting.png.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from experiments import study
from experiments.attention_scaling import timed
from models.attention.dilated import dilated_attention, validate_schedule
from models.attention.sparse import dilated_keys_per_query
from pipeline.report import line_plot, markdown_table
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


def schedules(spec) -> dict[str, tuple[list, list]]:
    """Name -> (w, r) for the grid's combinations and the named schedules, checked."""
    out = {}
    grid = spec.get("grid") or {}
    if grid:
        keys = ["w0", "ratio", "reach", "drop_largest"]
        unknown = sorted(set(grid) - set(keys))
        if unknown:
            raise ConfigError(f"grid keys {unknown} are not among {keys}")
        values = [list(grid.get(k, [0] if k == "drop_largest" else [])) for k in keys]
        for w0, ratio, reach, drop in itertools.product(*values):
            name = f"w0={w0}_ratio={ratio}" + (f"_drop={drop}" if drop else "")
            if len(values[2]) > 1:
                name += f"_reach={reach}"
            out[name] = geometric(int(w0), int(ratio), int(reach), int(drop))
    for name, s in (spec.get("schedules") or {}).items():
        out[str(name)] = ([int(x) for x in s.segment_lengths], [int(x) for x in s.dilation_rates])
    if not out:
        raise ConfigError("the study names no schedules: give a grid or schedules")
    for name, (w, r) in out.items():
        try:
            validate_schedule(w, r)
        except ValueError as err:
            raise ConfigError(f"schedule {name}: {err}") from err
    return out


def plan(spec, extra: list[str] = ()) -> list[dict]:
    length = int(spec.seq_len)
    if spec.tokens_per_batch % length:
        raise ConfigError(
            f"tokens_per_batch={spec.tokens_per_batch} is not a multiple of seq_len={length}"
        )
    runs = []
    for name, (w, r) in schedules(spec).items():
        argv = [
            str(study.ROOT / spec.model),
            *spec.train,
            "model.attention=dilated",
            f"model.segment_lengths={w}",
            f"model.dilation_rates={r}",
            f"data.seq_len={length}",
            f"data.batch_size={spec.tokens_per_batch // length}",
            f"trainer.max_steps={spec.steps}",
            *extra,
        ]
        cfg = study.resolve(argv)
        study.build_on_meta(cfg)  # a schedule the model refuses fails here, before training
        runs.append({"name": name, "w": w, "r": r, "argv": argv, "cfg": cfg})
    return runs


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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config", default=str(study.ROOT / "configs" / "study" / "ablate_dilation_tiny.yaml")
    )
    study.add_arguments(p)
    a = p.parse_args(argv)
    spec = study.load_study(a.config)
    runs = study.select(plan(spec, a.set), a.only, a.config)
    for r in runs:
        study.say(f"plan: {r['name']}: w={r['w']} r={r['r']}")
    if a.dry_run:
        return {}
    study.set_threads(a.threads)
    out = Path(a.out or study.ROOT / "runs" / spec.name)
    lengths = [int(n) for n in spec.eval.context_lengths]

    def score(r, run_dir):
        r["eval"] = study.ppl_by_length(study.eval_run(run_dir, lengths, list(spec.eval.args)))
        r["prompting"] = study.prompting(run_dir)

    study.train_and_score(runs, out, score)
    bench_n = int(spec.bench.seq_len)
    for r in runs:  # after training: the benchmark wants a quiet process
        m = r["cfg"].model
        r["keys_per_query"] = dilated_keys_per_query(r["w"], r["r"], int(spec.seq_len), m.n_head)
        r["attn_ms_per_1k"] = attention_ms_per_1k(
            r["w"], r["r"], bench_n, m.n_head, m.d_model // m.n_head, int(spec.bench.repeats)
        )
    return report(spec, runs, lengths, out)


def report(spec, runs, lengths, out: Path) -> dict:
    longest = lengths[-1]
    ranked = sorted(runs, key=lambda r: study.finite_or_inf(r["eval"].get(longest)))
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
        f"{spec.tokens_per_batch} tokens each; eval.py {' '.join(spec.eval.args)}; attention "
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
    line_plot(
        out / "prompting.png",
        {r["name"]: r["prompting"] for r in runs},
        "prompt length (tokens)",
        "mean NLL of the same final tokens",
        f"{spec.name}: prompting curve",
    )
    return study.write_report(out, text, {"runs": ranked}, ["ppl_vs_context.png", "prompting.png"])


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))

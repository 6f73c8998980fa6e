"""What every study shares: one directory, runs that are skipped once finished, tables, plots.

A study is a list of training runs, each trained by train.py and measured by eval.py, in
process. Everything goes under ``runs/<study>/``: ``<run>/`` is an ordinary train.py run
directory (checkpoints, logs, config.yaml, tokenizer.json) plus

- ``<run>/done.json``: written when training finished (steps, wall time, last validation
  perplexity). Its presence is what "finished" means: a second invocation skips the run; an
  interrupted one resumes from its last checkpoint (``resume=auto``), exactly;
- ``<run>/eval/``: eval.py's outputs for that run alone, skipped when present, so adding a run
  to a study evaluates only the new one.

The study's own table and plot are rebuilt from these files at the end of every invocation.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as eval_script  # noqa: E402
import train as train_script  # noqa: E402
from lightning_modules.config import ConfigError, load_config, split_argv  # noqa: E402
from models.transformer import ModelConfig, TransformerLM  # noqa: E402


def add_arguments(p) -> None:
    """The options every training study takes."""
    p.add_argument("--out", help="study directory (default runs/<name>)")
    p.add_argument("--only", nargs="*", help="names of the runs to do (default: all)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="train.py overrides for every run, after the study's own (e.g. seed=2 "
        "trainer.devices=8); they do not change run names, so give a new --out",
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--dry-run", action="store_true", help="check and print the plan only")


def select(runs: list[dict], only: list[str] | None, source) -> list[dict]:
    """The runs ``--only`` names (all without it); an unknown name is an error."""
    if not only:
        return runs
    names = [r["name"] for r in runs]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ConfigError(f"--only {unknown}: not runs of {source}; its runs: {names}")
    return [r for r in runs if r["name"] in only]


def say(message: str) -> None:
    """Progress, one timestamped line at a time (Lightning's bar shows the steps)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_study(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config {str(path)!r} does not exist")
    return OmegaConf.load(path)


def resolve(argv: list[str]):
    """The merged train.py config of a run (every key checked), without training it."""
    files, overrides = split_argv(argv)
    return load_config(files, overrides)


def build_on_meta(cfg) -> TransformerLM:
    """Builds a run's model on the meta device: its config is valid and its shapes fit,
    at any scale, without memory."""
    import torch

    model = dict(OmegaConf.to_container(cfg.model, resolve=True))
    model["vocab_size"] = model["vocab_size"] or cfg.data.vocab_size
    with torch.device("meta"):
        return TransformerLM(ModelConfig.from_dict(model))


def train_run(run_dir: Path, argv: list[str]) -> dict:
    """Trains one run unless ``done.json`` says it finished; returns what done.json holds."""
    done = run_dir / "done.json"
    if done.exists():
        say(f"{run_dir.name}: finished before, skipped")
        return json.loads(done.read_text())
    say(f"{run_dir.name}: training")
    start = time.perf_counter()
    trainer = train_script.train([*argv, f"run_dir={run_dir}", "resume=auto"])
    seconds = time.perf_counter() - start
    ppl = train_script.validation_perplexities(run_dir)
    info = {
        "steps": trainer.global_step,
        "train_seconds": round(seconds, 1),  # of the invocation that finished it
        "val_ppl": ppl[-1][1] if ppl else None,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    done.write_text(json.dumps(info, indent=1))
    say(f"{run_dir.name}: trained {info['steps']} steps in {seconds:.0f} s")
    return info


def eval_run(run_dir: Path, lengths: list[int], extra: list[str]) -> list[dict]:
    """eval.py on a run's last checkpoint into ``<run>/eval`` unless already there; returns
    its rows (model, context_length, ppl, tokens, note, documents)."""
    out = run_dir / "eval"
    result = out / "ppl_vs_context.json"
    if result.exists():
        say(f"{run_dir.name}: evaluated before, skipped")
    else:
        say(f"{run_dir.name}: evaluating at {lengths}")
        start = time.perf_counter()
        eval_script.run(
            [
                f"checkpoints=[{run_dir / 'checkpoints' / 'last.ckpt'}]",
                f"context_lengths=[{','.join(str(n) for n in lengths)}]",
                f"out_dir={out}",
                *extra,
            ]
        )
        info = {"eval_seconds": round(time.perf_counter() - start, 1)}
        (out / "timing.json").write_text(json.dumps(info))
    return json.loads(result.read_text())["rows"]


def eval_seconds(run_dir: Path) -> float | None:
    f = run_dir / "eval" / "timing.json"
    return json.loads(f.read_text())["eval_seconds"] if f.exists() else None


def prompting(run_dir: Path) -> dict[int, float]:
    """Prompt length -> mean NLL of the fixed suffix, from the run's eval outputs."""
    f = run_dir / "eval" / "prompting.csv"
    if not f.exists() or not f.read_text().strip():
        return {}
    with open(f, newline="") as fh:
        return {int(r["prompt_length"]): float(r["mean_nll"]) for r in csv.DictReader(fh)}


def ppl_by_length(rows: list[dict]) -> dict[int, float]:
    """Context length -> perplexity; NaN where eval.py reported the length not reached."""
    return {int(r["context_length"]): float(r["ppl"]) if r["ppl"] != "" else math.nan for r in rows}


def finite_or_inf(x) -> float:
    """A sort key that puts missing and NaN values last."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else math.inf


def fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(path: Path, curves: dict[str, dict[int, float]], xlabel, ylabel, title) -> None:
    """One line per name, log2 x axis; NaN points are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        pts = sorted((x, y) for x, y in points.items() if not math.isnan(y))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8, wrap=True)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(out: Path, text: list[str], results: dict, plots: list[str]) -> dict:
    """table.md and results.json (runs without their resolved configs), the table printed."""
    results = {
        **results,
        "runs": [{k: v for k, v in r.items() if k != "cfg"} for r in results["runs"]],
    }
    (out / "table.md").write_text("\n".join(text) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(text))
    say(f"wrote {out}/table.md, results.json, {', '.join(plots)}")
    return results


def set_threads(threads: int | None) -> None:
    """Intra-op threads of this process (two studies can then share the cores)."""
    if threads:
        import torch

        torch.set_num_threads(threads)

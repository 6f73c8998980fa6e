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

import dataclasses
import json
import math
import time
from pathlib import Path

from omegaconf import OmegaConf

from models.transformer import TransformerLM
from pipeline import outputs
from pipeline.evaluation import evaluate
from pipeline.training import train
from settings.loading import ConfigError, load_run_config, split_argv
from settings.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]


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
    """A study's YAML (its own keys: runs, train overrides, eval settings)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config {str(path)!r} does not exist")
    return OmegaConf.load(path)


def resolve(argv: list[str]) -> RunConfig:
    """The checked train.py config of a run, without training it."""
    return load_run_config(*split_argv(argv))


def build_on_meta(cfg: RunConfig) -> TransformerLM:
    """Builds a run's model on the meta device: its config is valid and its shapes fit,
    at any scale, without memory."""
    import torch

    model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.vocab_size)
    with torch.device("meta"):
        return TransformerLM(model)


def train_run(run_dir: Path, argv: list[str]) -> dict:
    """Trains one run unless ``done.json`` says it finished; returns what done.json holds."""
    done = run_dir / "done.json"
    if done.exists():
        say(f"{run_dir.name}: finished before, skipped")
        return json.loads(done.read_text())
    say(f"{run_dir.name}: training")
    start = time.perf_counter()
    trainer = train([*argv, f"run_dir={run_dir}", "resume=auto"])
    seconds = time.perf_counter() - start
    ppl = outputs.validation_perplexities(run_dir)
    info = {
        "steps": trainer.global_step,
        "train_seconds": round(seconds, 1),  # of the invocation that finished it
        "val_ppl": ppl[-1][1] if ppl else None,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    done.write_text(json.dumps(info, indent=1))
    say(f"{run_dir.name}: trained {info['steps']} steps in {seconds:.0f} s")
    return info


def train_and_score(runs: list[dict], out: Path, score) -> None:
    """Trains each run (``train_run`` into ``out/<name>``, skipped once finished), then calls
    ``score(run, run_dir)`` to fill in its evaluation; says the progress and the total time."""
    start = time.perf_counter()
    for i, r in enumerate(runs, 1):
        say(f"[{i}/{len(runs)}] {r['name']}")
        run_dir = out / r["name"]
        r["train"] = train_run(run_dir, r["argv"])
        score(r, run_dir)
    say(f"done in {time.perf_counter() - start:.0f} s (this invocation)")


def eval_run(run_dir: Path, lengths: list[int], extra: list[str]) -> list[dict]:
    """eval.py on a run's last checkpoint into ``<run>/eval`` unless already there; returns
    its rows (model, context_length, ppl, tokens, note, documents)."""
    out = run_dir / "eval"
    if (out / "ppl_vs_context.json").exists():
        say(f"{run_dir.name}: evaluated before, skipped")
    else:
        say(f"{run_dir.name}: evaluating at {lengths}")
        start = time.perf_counter()
        evaluate(
            [
                f"checkpoints=[{run_dir / 'checkpoints' / 'last.ckpt'}]",
                f"context_lengths=[{','.join(str(n) for n in lengths)}]",
                f"out_dir={out}",
                *extra,
            ]
        )
        info = {"eval_seconds": round(time.perf_counter() - start, 1)}
        (out / "timing.json").write_text(json.dumps(info))
    return outputs.eval_rows(out)


def eval_seconds(run_dir: Path) -> float | None:
    f = run_dir / "eval" / "timing.json"
    return json.loads(f.read_text())["eval_seconds"] if f.exists() else None


def prompting(run_dir: Path) -> dict[int, float]:
    """Prompt length -> mean NLL of the fixed suffix, from the run's eval outputs."""
    return outputs.prompting(run_dir / "eval")


ppl_by_length = outputs.ppl_by_length


def finite_or_inf(x) -> float:
    """A sort key that puts missing and NaN values last."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else math.inf


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

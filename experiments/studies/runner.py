"""What every study shares: one ``main``, one directory, runs that are skipped once finished.

A study (paper_table2.py, ablate_dilation.py, long_range.py) is a :class:`Study`: its YAML's
schema (schema.py), a ``plan`` that turns the YAML into :class:`Run` s, a ``score`` that
measures one trained run and a ``finish`` that writes the table. :func:`main` does the rest,
the same for all: options, loading and checking the YAML and every run's train.py config
(before anything trains), ``--only``/``--shard`` selection, training, resuming.

Each run is trained by train.py and measured by eval.py, in process. Everything goes under
``runs/<study>/``: ``<run>/`` is an ordinary train.py run directory (checkpoints, logs,
config.yaml, tokenizer.json) plus

- ``<run>/done.json``: written when training finished (steps, wall time, last validation
  perplexity). Its presence is what "finished" means: a second invocation skips the run; an
  interrupted one resumes from its last checkpoint (``resume=auto``), exactly;
- ``<run>/eval/``: eval.py's outputs for that run alone, skipped when present, so adding a run
  to a study evaluates only the new one.

The study's own table and plot are rebuilt from these files at the end of every invocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from experiments.studies.schema import load_study
from models.transformer import TransformerLM
from pipeline import outputs
from pipeline.evaluation import evaluate
from pipeline.provenance import write_results
from pipeline.training import train
from settings.loading import ConfigError, load_run_config, split_argv
from settings.schema import RunConfig

ROOT = Path(__file__).resolve().parents[2]
SHARED = "*"  # the ``stage`` of a shared curriculum stage: it comes before every run


@dataclass
class Run:
    """One training run of a study, as planned: its train.py command line, checked."""

    name: str  # its directory under runs/<study>/
    argv: list[str]  # train.py's arguments
    cfg: RunConfig  # what they resolve to
    summary: str = ""  # the plan's line for it
    facts: dict = field(default_factory=dict)  # what the study's table says of it
    stage: str | None = None  # a curriculum stage: the name of the run it comes before


@dataclass
class FinishedRun:
    """A run after training and scoring."""

    run: Run
    train: dict  # done.json: steps, train_seconds, val_ppl, finished
    scores: dict  # what the study's ``score`` measured

    @property
    def name(self) -> str:
        return self.run.name

    def row(self, **more) -> dict:
        """The run as results.json lists it."""
        r = self.run
        return {"name": r.name, **r.facts, "argv": r.argv, "train": self.train, **self.scores,
                **more}  # fmt: skip


@dataclass(frozen=True)
class Study:
    """What makes one study; :func:`main` does everything else."""

    doc: str  # the --help text
    schema: type  # the YAML's dataclass (schema.py)
    default_config: Callable[[argparse.Namespace], Path]  # without --config
    plan: Callable[..., list[Run]]  # (spec, --set, out, args) -> every run, in training order
    score: Callable[..., dict]  # (spec, run, run_dir) -> its measurements, after its training
    finish: Callable[..., dict]  # (spec, results, out, args) -> results.json, after all
    options: Callable[[argparse.ArgumentParser], None] = lambda p: None  # its own flags
    out_name: Callable[..., str] = lambda spec, args: spec.name  # runs/<this>/


def parse_args(study: Study, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=study.doc, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config", help="the study YAML (default: configs/study/<study>_tiny.yaml)")
    study.options(p)
    p.add_argument("--out", help="study directory (default runs/<name>)")
    p.add_argument("--only", nargs="*", help="names of the runs to do (default: all)")
    p.add_argument("--shard", metavar="I/N", help="only every N-th run from the I-th (0-based): "
                   "N processes of --threads 1 share the cores (make longrange)")  # fmt: skip
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
    return p.parse_args(argv)


def main(study: Study, argv: list[str] | None = None) -> dict:
    """Loads and checks the study and every run's config, then trains and scores each run
    not yet finished, then writes the table; ``{}`` with ``--dry-run``."""
    args = parse_args(study, argv)
    path = Path(args.config) if args.config else study.default_config(args)
    spec = load_study(path, study.schema)
    out = Path(args.out or ROOT / "runs" / study.out_name(spec, args))
    runs = select(study.plan(spec, args.set, out, args), args.only, args.shard, path)
    for r in runs:
        say(f"plan: {r.name}: {r.summary}")
    if args.dry_run:
        return {}
    set_threads(args.threads)
    start, results = time.perf_counter(), []
    for i, run in enumerate(runs, 1):
        say(f"[{i}/{len(runs)}] {run.name}")
        trained = train_run(out / run.name, run.argv)
        results.append(FinishedRun(run, trained, study.score(spec, run, out / run.name)))
    say(f"done in {time.perf_counter() - start:.0f} s (this invocation)")
    return study.finish(spec, results, out, args)


def select(runs: list[Run], only: list[str] | None, shard: str | None, source) -> list[Run]:
    """The runs ``--only`` names (all without it), then every N-th of them (``--shard I/N``);
    a curriculum stage goes with its run, a shared one with any. An unknown name is an error."""
    names = [r.name for r in runs]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ConfigError(f"--only {unknown}: not runs of {source}; its runs: {names}")
    wanted = [r.name for r in runs if r.stage is None and (not only or r.name in only)]
    if shard:
        wanted = wanted[shard_slice(shard)]
    return [r for r in runs if (r.stage or r.name) in wanted or (r.stage == SHARED and wanted)]


def shard_slice(text: str) -> slice:
    """``I/N`` -> the slice of every N-th run from the I-th; a ConfigError if malformed."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return slice(i, None, n)


def say(message: str) -> None:
    """Progress, one timestamped line at a time (Lightning's bar shows the steps)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def resolve(argv: list[str]) -> RunConfig:
    """The checked train.py config of a run, without training it."""
    return load_run_config(*split_argv(argv))


def checked_run(name: str, argv: list[str], **info) -> Run:
    """A :class:`Run` whose config resolves and whose model builds on the meta device (its
    shapes fit, at any scale, without memory): a config the model refuses fails here, before
    anything trains."""
    import torch

    cfg = resolve(argv)
    model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.vocab_size)
    with torch.device("meta"):
        TransformerLM(model)
    return Run(name, argv, cfg, **info)


def staged(
    spec,
    name: str,
    argv: list[str],
    seq_len: int,
    steps: int,
    extra,
    out: Path,
    make: Callable[..., Run] = checked_run,
    quick: bool = False,
    first: str | None = None,
    **info,
) -> list[Run]:
    """The runs that train ``name`` at ``seq_len`` for ``steps`` (``argv``: its train.py
    arguments but length, batch and steps). With the study's ``curriculum``, a short stage
    ``<name>.<length>`` comes first (its ``stage`` the run's name; the curriculum's length and
    steps, the same tokens per batch, then the curriculum's own overrides) and the run starts
    from its weights (``init_from``: the optimizer, schedule and data start afresh). A
    ``shared`` curriculum has one stage, the study's ``first`` run's (its ``stage`` is
    :data:`SHARED`: it goes with every run), and every run starts from it. Without a
    curriculum, the run alone. ``make(name, argv, **info)`` checks each."""
    per, curriculum, runs, init = spec.tokens_per_batch, spec.curriculum, [], []
    if curriculum is not None:
        short = curriculum.seq_len
        n = (
            curriculum.quick_steps
            if quick and curriculum.quick_steps is not None
            else curriculum.steps
        )
        owner = first if curriculum.shared and first is not None else name
        warm = f"{owner}.{short}"
        if owner == name:
            runs.append(make(warm, [*argv, f"data.seq_len={short}",
                                    f"data.batch_size={per // short}", f"trainer.max_steps={n}",
                                    *curriculum.train, *extra],
                             stage=SHARED if curriculum.shared else name,
                             summary=f"{short}-token stage of "
                                     f"{'every run' if curriculum.shared else name}"))  # fmt: skip
        init = [f"init_from={out / warm / 'checkpoints' / 'last.ckpt'}"]
    runs.append(make(name, [*argv, f"data.seq_len={seq_len}", f"data.batch_size={per // seq_len}",
                            f"trainer.max_steps={steps}", *init, *extra], **info))  # fmt: skip
    return runs


def without_stages(results: list[FinishedRun]) -> list[FinishedRun]:
    """The study's own runs, each with its curriculum stage's training seconds added (the
    table's cost of a run is both)."""
    stages = {r.run.stage: r for r in results if r.run.stage}
    runs = []
    for r in results:
        if r.run.stage:
            continue
        if r.name in stages:
            before = stages[r.name].train
            r = dataclasses.replace(r, train={**r.train, "stage": before,
                "train_seconds": r.train["train_seconds"] + before["train_seconds"]})  # fmt: skip
        runs.append(r)
    return runs


def curriculum_text(spec, stages: list[FinishedRun]) -> str:
    """How the curriculum stages trained, for a table's caption ('' without any)."""
    if not stages:
        return ""
    steps = ", ".join(str(s) for s in sorted({r.run.cfg.trainer.get("max_steps") for r in stages}))
    overrides = " ".join(spec.curriculum.train)
    if spec.curriculum.shared:
        return (f", each starting from the weights of one {steps}-step stage at "
                f"{spec.curriculum.seq_len} tokens ({overrides}; {stages[0].name}, "
                f"{stages[0].train['train_seconds']:.0f} s)")  # fmt: skip
    return (f", each after {steps} steps at {spec.curriculum.seq_len} tokens ({overrides}) "
            "whose weights it starts from")  # fmt: skip


def train_run(run_dir: Path, argv: list[str]) -> dict:
    """Trains one run unless ``done.json`` says it finished; returns what done.json holds."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as lock:
        # two processes of one study (--shard) may both need a shared stage: the second
        # waits here for the first to finish it, then finds done.json
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _train_run(run_dir, argv)


def _train_run(run_dir: Path, argv: list[str]) -> dict:
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
    write_results(done, info)  # the code and machine that trained it, in "meta"
    say(f"{run_dir.name}: trained {info['steps']} steps in {seconds:.0f} s")
    return info


def eval_run(run_dir: Path, lengths: list[int], extra: list[str], done: str) -> Path:
    """eval.py on a run's last checkpoint into ``<run>/eval`` unless ``done`` (a file of its
    outputs) is already there; returns that directory."""
    out = run_dir / "eval"
    if (out / done).exists():
        say(f"{run_dir.name}: evaluated before, skipped")
        return out
    say(f"{run_dir.name}: evaluating at {lengths}")
    start = time.perf_counter()
    evaluate([f"checkpoints=[{run_dir / 'checkpoints' / 'last.ckpt'}]",
              f"context_lengths=[{','.join(str(n) for n in lengths)}]", f"out_dir={out}",
              *extra])  # fmt: skip
    write_results(out / "timing.json", {"eval_seconds": round(time.perf_counter() - start, 1)})
    return out


def eval_seconds(run_dir: Path) -> float | None:
    f = run_dir / "eval" / "timing.json"
    return json.loads(f.read_text())["eval_seconds"] if f.exists() else None


def ppl_by_length(run_dir: Path, spec) -> dict[int, float]:
    """Context length -> perplexity of a run, evaluated by eval.py as the study says."""
    lengths = list(spec.eval.context_lengths)
    return outputs.ppl_by_length(
        outputs.eval_rows(eval_run(run_dir, lengths, list(spec.eval.args), "ppl_vs_context.json"))
    )


def finite_or_inf(x) -> float:
    """A sort key that puts missing and NaN values last."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else math.inf


def write_report(out: Path, text: list[str], results: dict, plots: list[str]) -> dict:
    """table.md and results.json (with its provenance), the table printed; returns the
    results."""
    (out / "table.md").write_text("\n".join(text) + "\n")
    write_results(out / "results.json", results)
    print("\n".join(text))
    say(f"wrote {out}/table.md, results.json, {', '.join(plots)}")
    return results


def set_threads(threads: int | None) -> None:
    """Intra-op threads of this process (two studies can then share the cores)."""
    if threads:
        import torch

        torch.set_num_threads(threads)

"""Training tokens per second and peak memory of the tiny LongNet, dense and sparse models at
context lengths 2K to 32K on this machine, and the length at which LongNet overtakes dense.
On CUDA the same script reports model FLOPs utilisation.

    python -m experiments.bench.throughput                         # the three tiny models
    python -m experiments.bench.throughput --lengths 2048 8192 --repeats 1   # a quicker look
    python -m experiments.bench.throughput --models longnet_tiny transformer_tiny --max-seconds 30

One training step is what train.py does on one batch: the LightningModule's training_step
(forward and the chunked cross-entropy loss, ``loss_chunk`` 8192), backward, an AdamW step
(lr 1e-4) and zero_grad, on a batch of one sequence of N tokens, so a step trains N tokens.
For each model and N: tokens/s = N / the median step time of --repeats steps after one
warm-up step, and the step's peak memory: how far memory grows above the model, its
optimizer state and what the process already holds (activations, gradients, workspace). On
CPU that is the growth of the resident set's high-water mark, in a call apart from the timed
ones (with glibc's MALLOC_MMAP_THRESHOLD_ fixed by re-running the script, see measure.py),
on CUDA torch's peak allocation. fp32 on CPU, bf16 autocast on CUDA, where model FLOPs
utilisation is also reported:
flops_per_token(config, N) * tokens/s / --peak-tflops (989: H100/H200 bf16 dense).

A model whose step at some N takes longer than --max-seconds skips the longer lengths; a
length that fails (out of memory) is reported as not reached. Prints the machine and a
markdown table, and writes experiments/results/throughput/throughput.{csv,json,png}. How long
the default run takes: see experiments/README.md.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from experiments.bench.measure import (
    RESULTS,
    fixed_mmap_threshold,
    language_model,
    machine,
    timed,
    train_step,
    window,
)
from models.transformer import ModelConfig, flops_per_token
from pipeline import display
from pipeline.provenance import write_results
from pipeline.scoring import not_reached
from settings.cli import run_cli
from settings.loading import model_config_named

MODELS = ["longnet_tiny", "transformer_tiny", "sparse_transformer_tiny"]
LENGTHS = [2048, 4096, 8192, 16384, 32768]
COLUMNS = [
    "model",
    "attention",
    "n",
    "status",
    "step_s",
    "tokens_per_s",
    "peak_mib",
    "tflops",
    "mfu",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, help="names in configs/model/")
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="tokens per step")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median) after a warm-up")
    p.add_argument("--max-seconds", type=float, default=120.0, help="per step, else skip longer")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="CUDA peak for the MFU")
    p.add_argument("--out", type=Path, default=RESULTS / "throughput")
    args = p.parse_args(argv)
    if any(n <= 0 for n in args.lengths):
        p.error(f"--lengths must be positive, got {args.lengths}")
    for name in ("repeats", "max_seconds", "peak_tflops"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    args.lengths = sorted(set(args.lengths))
    args.models = list(dict.fromkeys(args.models))
    return args


def measure(module, optimizer, cfg: ModelConfig, n: int, args) -> dict:
    """Median step seconds, tokens/s and peak MiB at length n; raises RuntimeError on OOM."""
    batch = window(torch.randint(0, cfg.vocab_size, (1, n + 1), device=args.device))
    step_s, peak = timed(
        lambda: train_step(module, optimizer, batch, args.dtype), args.device, args.repeats
    )
    tflops = flops_per_token(cfg, n) * n / step_s / 1e12
    mfu = tflops / args.peak_tflops if args.device.type == "cuda" else None
    return {
        "status": "ok",
        "step_s": step_s,
        "tokens_per_s": n / step_s,
        "peak_mib": peak / 2**20,
        "tflops": tflops,
        "mfu": mfu,
    }


def run_model(name: str, cfg: ModelConfig, args) -> list[dict]:
    """Every length for one model, shortest first; a slow or failed length skips the rest."""
    module = language_model(cfg, device=args.device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    rows, skip = [], None
    for n in args.lengths:
        row = {"model": name, "attention": cfg.attention, "n": n}
        if skip:
            rows.append({**row, "status": skip})
            continue
        try:
            row.update(measure(module, optimizer, cfg, n, args))
        except (RuntimeError, MemoryError) as e:  # out of memory, on either device
            if not isinstance(e, MemoryError) and not_reached(e) is None:
                raise  # a bug, not a limit of this machine
            row["status"] = "not reached: " + (str(e).strip().splitlines() or [type(e).__name__])[0]
            skip = f"skipped (not reached at {n})"
        _free(optimizer, args.device)
        if row["status"] == "ok" and row["step_s"] > args.max_seconds:
            skip = f"skipped (step at {n} took {row['step_s']:.0f} s)"
        rows.append(row)
        print(f"  {name} N={n}: {_cell(row)}", flush=True)
    return rows


def _free(optimizer, device: torch.device) -> None:
    optimizer.zero_grad(set_to_none=True)  # a failed step may leave gradients behind
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cell(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    mfu = "" if row["mfu"] is None else f", MFU {100 * row['mfu']:.1f}%"
    return f"{row['tokens_per_s']:.0f} tok/s, {row['peak_mib']:.0f} MiB{mfu}"


def crossover(rows: list[dict]) -> str:
    """The smallest length from which LongNet trains more tokens/s than dense at every longer
    length where both were measured (the first dilated and first dense model in --models)."""
    first = {}
    for r in rows:
        first.setdefault(r["attention"], r["model"])
    if "dilated" not in first or "dense" not in first:
        return "LongNet vs dense: needs a dilated and a dense model in --models"
    longnet, dense = (_speeds(rows, first[a]) for a in ("dilated", "dense"))
    both = sorted(set(longnet) & set(dense))
    if not both:
        return "LongNet vs dense: no length measured for both"
    since = None
    for n in both:
        since = (since or n) if longnet[n] > dense[n] else None
    notes = [f"{first['dilated']} vs {first['dense']}"]
    if since == both[0]:
        notes.append("ahead at every length measured for both")
    if max(longnet) > both[-1]:
        notes.append(f"dense not measured beyond N={both[-1]}")
    note = f" ({'; '.join(notes)})"
    if since is None:
        return f"LongNet does not overtake dense within the measured lengths{note}"
    return f"LongNet overtakes dense at N={since}{note}"


def _speeds(rows: list[dict], model: str) -> dict[int, float]:
    return {r["n"]: r["tokens_per_s"] for r in rows if r["model"] == model and r["status"] == "ok"}


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def table(rows: list[dict], models: list[str], lengths: list[int], cuda: bool) -> str:
    per_model = ["tok/s", "peak MiB"] + (["MFU %"] if cuda else [])
    header = ["N"] + [f"{m} {c}" for m in models for c in per_model]
    by_key = {(r["model"], r["n"]): r for r in rows}
    body = []
    for n in lengths:
        cells = [_length(n)]
        for m in models:
            r = by_key[(m, n)]
            if r["status"] != "ok":
                cells += [r["status"]] + ["-"] * (len(per_model) - 1)
                continue
            cells += [f"{r['tokens_per_s']:.0f}", f"{r['peak_mib']:.0f}"]
            cells += [f"{100 * r['mfu']:.1f}"] if cuda else []
        body.append(cells)
    return display.markdown_table(header, body)


def write_outputs(rows: list[dict], info: dict, verdict: str, args) -> None:
    write_results(args.out / "throughput.csv", rows, COLUMNS)
    settings = {k: getattr(args, k) for k in ("models", "lengths", "repeats", "max_seconds")}
    summary = {
        "machine": info,
        "settings": {**settings, "peak_tflops": args.peak_tflops},
        "crossover": verdict,
        "rows": rows,
    }
    write_results(args.out / "throughput.json", summary)
    plot(rows, args.models, args.out / "throughput.png", info)


def plot(rows: list[dict], models: list[str], path: Path, info: dict) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    curves = {m: {r["n"]: r["tokens_per_s"] for r in ok if r["model"] == m} for m in models}
    display.line_plot(path, curves, "context length N (tokens, batch of one sequence)",
                      "training tokens / s (median step)",
                      f"Training throughput, {info['device']}, {info['dtype']}", logy=True,
                      fontsize=9)  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    configs = {
        name: model_config_named(name) for name in args.models
    }  # an unknown name fails before any run
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    info = machine(args.device, args.dtype)
    print(", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    torch.manual_seed(0)
    rows = []
    for name, cfg in configs.items():
        rows += run_model(name, cfg, args)
    verdict = crossover(rows)
    print(table(rows, args.models, args.lengths, args.device.type == "cuda"))
    print(verdict)
    write_outputs(rows, info, verdict, args)
    print(f"median of {args.repeats} steps after one warm-up; wrote {args.out}/throughput.*")


if __name__ == "__main__":
    fixed_mmap_threshold()
    sys.exit(run_cli(main, sys.argv[1:]))

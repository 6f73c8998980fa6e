"""Size, FLOPs and measured training-step time of the model configs, side by side.

    python -m experiments.bench.model_cost                 # the tiny models at 2K and 8K
    python -m experiments.bench.model_cost --models longnet_tiny transformer_tiny --lengths 2048

For each config in configs/model/: parameters, training FLOPs per token (attention included,
per type), and the median time of one training step as train.py takes it (the
LightningModule's training_step with its chunked loss, backward, an AdamW step) on one
sequence of each length, fp32 on CPU (bf16 on CUDA). Prints a markdown table, writes
experiments/results/model_cost/model_cost.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from experiments.bench.measure import RESULTS, language_model, median, train_step, window
from models.transformer import flops_per_token, n_params
from pipeline.provenance import write_results
from settings.cli import run_cli
from settings.loading import model_config_named

TINY = ["longnet_tiny", "transformer_tiny", "sparse_transformer_tiny", "sliding_window_tiny"]


def step_time(module, optimizer, batch: dict, dtype, repeats: int) -> float:
    """Median seconds of ``repeats`` training steps on ``batch``, after a warm-up one."""
    device = batch["input_ids"].device

    def step():
        train_step(module, optimizer, batch, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=TINY)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "model_cost")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        cfg = model_config_named(name)
        module = language_model(cfg, device=device)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
        row = {"model": name, "attention": cfg.attention, "params": n_params(cfg)}
        for n in args.lengths:
            row[f"gflops_per_token@{n}"] = flops_per_token(cfg, n) / 1e9
            batch = window(torch.randint(0, cfg.vocab_size, (1, n + 1), device=device))
            row[f"step_s@{n}"] = step_time(module, optimizer, batch, dtype, args.repeats)
        rows.append(row)
        print(row, flush=True)
    write_results(args.out / "model_cost.csv", rows)
    head = "| model | attention | params (M) | " + " | ".join(
        f"GFLOP/token @{n} | train step s @{n}" for n in args.lengths
    )
    print(head + " |\n|" + "---|" * (3 + 2 * len(args.lengths)))
    for r in rows:
        cells = [f"{r['model']}", r["attention"], f"{r['params'] / 1e6:.1f}"]
        for n in args.lengths:
            cells += [f"{r[f'gflops_per_token@{n}']:.3f}", f"{r[f'step_s@{n}']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print(
        f"device={device} dtype={str(dtype)[6:]} threads={torch.get_num_threads()}, "
        f"median of {args.repeats}; wrote {args.out / 'model_cost.csv'}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))

"""Size, FLOPs and measured training-step time of the model configs, side by side.

    python -m experiments.model_cost                       # the tiny models at 2K and 8K
    python -m experiments.model_cost --models longnet_tiny transformer_tiny --lengths 2048

For each config in configs/model/: parameters, training FLOPs per token (attention included,
per type), and the median time of forward + backward (cross-entropy loss) on one sequence of
each length, fp32 on CPU (bf16 on CUDA). Prints a markdown table, writes
runs/model_cost/model_cost.csv.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.transformer import TransformerLM, flops_per_token, n_params
from settings.cli import run_cli
from settings.loading import model_config_named

ROOT = Path(__file__).resolve().parents[1]
TINY = ["longnet_tiny", "transformer_tiny", "sparse_transformer_tiny", "sliding_window_tiny"]


load = model_config_named  # configs/model/<name>.yaml as a ModelConfig


def step_time(model, n, device, dtype, repeats):
    tokens = torch.randint(0, model.config.vocab_size, (1, n + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=TINY)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("runs/model_cost"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        cfg = load(name)
        model = TransformerLM(cfg).to(device)
        row = {"model": name, "attention": cfg.attention, "params": n_params(cfg)}
        for n in args.lengths:
            row[f"gflops_per_token@{n}"] = flops_per_token(cfg, n) / 1e9
            row[f"fwd_bwd_s@{n}"] = step_time(model, n, device, dtype, args.repeats)
        rows.append(row)
        print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "model_cost.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    head = "| model | attention | params (M) | " + " | ".join(
        f"GFLOP/token @{n} | fwd+bwd s @{n}" for n in args.lengths
    )
    print(head + " |\n|" + "---|" * (3 + 2 * len(args.lengths)))
    for r in rows:
        cells = [f"{r['model']}", r["attention"], f"{r['params'] / 1e6:.1f}"]
        for n in args.lengths:
            cells += [f"{r[f'gflops_per_token@{n}']:.3f}", f"{r[f'fwd_bwd_s@{n}']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print(
        f"device={device} dtype={str(dtype)[6:]} threads={torch.get_num_threads()}, "
        f"median of {args.repeats}; wrote {args.out / 'model_cost.csv'}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))

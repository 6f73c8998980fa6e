"""How dilated attention scales with sequence length, against its kernel floor and dense SDPA.

    python -m experiments.bench.attention_scaling          # the full table (~20 min on 2 cores)
    python -m experiments.bench.attention_scaling --quick  # 8K-32K, one repeat, a minute or two

For each N: forward (inference mode) and forward+backward time, median of --repeats runs, and
peak memory, of `dilated_attention` with the paper's schedule (w = 2048..32768, r = 1..12),
B=1, H=12, D=64. Beside it, in the same run:
- the kernel floor: the bare attention kernel on pre-gathered, contiguous tensors of the same
  sizes (for each pair, its segments folded into the batch), summed over the pairs. What
  dilated attention adds on top (gathers, mixing, scatters) is the ratio to this floor;
- dense causal attention (torch SDPA) up to --dense-max.
Writes experiments/results/attention_scaling/attention_scaling.{csv,png} and prints a markdown
table. Runs on CUDA unchanged (bf16 by default there); on CPU, peak memory is the growth of the
process's resident-set high-water mark in a call of its own (the timed calls run with
nothing measuring beside them), on CUDA torch's peak allocation.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from experiments.bench.measure import PAPER_R, PAPER_W, RESULTS, K, fixed_mmap_threshold, timed
from models.attention.backends import attention_backward, attention_forward
from models.attention.dilated import dilated_attention
from pipeline import display
from pipeline.provenance import write_results


def make_qkv(n, args, grad=False):
    shape = (1, n, args.heads, args.head_dim)
    return [
        torch.randn(shape, device=args.device, dtype=args.dtype).requires_grad_(grad)
        for _ in range(3)
    ]


def dilated_runs(n, args):
    def fwd():
        with torch.inference_mode():
            dilated_attention(*qkv, PAPER_W, PAPER_R)

    def fwd_bwd():
        out = dilated_attention(*qkv_g, PAPER_W, PAPER_R)
        out.backward(grad)

    qkv = make_qkv(n, args)
    res = {"fwd_s": None, "fwd_mem": None, "fwdbwd_s": None, "fwdbwd_mem": None}
    res["fwd_s"], res["fwd_mem"] = timed(fwd, args.device, args.repeats_for(n))
    if n <= args.max_backward:
        del qkv
        qkv_g = make_qkv(n, args, grad=True)
        grad = torch.randn_like(qkv_g[0])
        res["fwdbwd_s"], res["fwdbwd_mem"] = timed(fwd_bwd, args.device, args.repeats_for(n))
    return res


def floor_runs(n, args):
    """The kernel alone on pre-gathered (G, M, H, D) blocks, one call per pair."""
    blocks = []
    for w, r in zip(PAPER_W, PAPER_R, strict=True):
        w = min(w, n)
        groups, m = math.ceil(n / w), math.ceil(w / r)
        shape = (groups, m, args.heads, args.head_dim)
        blocks.append([torch.randn(shape, device=args.device, dtype=args.dtype) for _ in range(4)])
    scale = args.head_dim**-0.5

    def fwd():
        return [
            attention_forward(q, k, v, causal=True, scale=scale, backend=args.backend)
            for q, k, v, _ in blocks
        ]

    def fwd_bwd():
        for (q, k, v, do), (out, lse) in zip(blocks, fwd(), strict=True):
            attention_backward(
                do, q, k, v, out, lse, causal=True, scale=scale, backend=args.backend
            )

    with torch.inference_mode():
        floor_fwd, _ = timed(fwd, args.device, args.repeats_for(n))
        floor_fb = timed(fwd_bwd, args.device, args.repeats_for(n))[0]
    return {"floor_fwd_s": floor_fwd, "floor_fwdbwd_s": floor_fb}


def dense_runs(n, args):
    def fwd():
        with torch.inference_mode():
            sdpa(*(x.transpose(1, 2) for x in qkv), is_causal=True)

    def fwd_bwd():
        sdpa(*(x.transpose(1, 2) for x in qkv_g), is_causal=True).backward(grad)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    qkv = make_qkv(n, args)
    qkv_g = make_qkv(n, args, grad=True)
    grad = torch.randn_like(qkv_g[0]).transpose(1, 2)
    return {
        "dense_fwd_s": timed(fwd, args.device, args.repeats_for(n))[0],
        "dense_fwdbwd_s": timed(fwd_bwd, args.device, args.repeats_for(n))[0],
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help="sequence lengths (tokens)")
    p.add_argument("--quick", action="store_true", help="8K-32K, one repeat")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--max-backward", type=int, default=256 * K, help="fwd only above this N")
    p.add_argument("--dense-max", type=int, default=32 * K, help="dense SDPA up to this N")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "flash", "math"])
    p.add_argument("--out", type=Path, default=RESULTS / "attention_scaling")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [8 * K, 16 * K, 32 * K]
        args.repeats = 1
    args.sizes = args.sizes or [s * K for s in (8, 16, 32, 64, 128, 256, 512, 1024)]
    if any(s <= 0 for s in args.sizes) or args.repeats <= 0:
        p.error(f"sizes and repeats must be positive, got {args.sizes} and {args.repeats}")
    args.device = torch.device(args.device)
    args.dtype = getattr(
        torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    )
    if args.backend == "auto":
        from models.attention.backends import resolve_backend

        args.backend = resolve_backend("auto", torch.empty(0, device=args.device, dtype=args.dtype))
    # the longest runs take minutes each: one repeat is enough above the backward limit
    args.repeats_for = lambda n: 1 if n > args.max_backward else args.repeats
    return args


def cell(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main(argv=None):
    args = parse_args(argv)

    torch.manual_seed(0)
    rows = []
    print(
        f"device={args.device} dtype={str(args.dtype)[6:]} backend={args.backend} "
        f"threads={torch.get_num_threads()} B=1 H={args.heads} D={args.head_dim} "
        f"w={PAPER_W} r={PAPER_R}",
        flush=True,
    )
    for n in args.sizes:
        row = {"n": n, **dilated_runs(n, args)}
        if n <= args.max_backward:
            row.update(floor_runs(n, args))
        if n <= args.dense_max:
            row.update(dense_runs(n, args))
        rows.append(row)
        print(
            f"  N={n}: " + ", ".join(f"{k}={cell(v, '.4g')}" for k, v in row.items() if k != "n"),
            flush=True,
        )
    write_results(args.out / "attention_scaling.csv", rows, COLUMNS)
    print(table(rows))
    print(summary(rows))
    plot(rows, args.out / "attention_scaling.png", args)
    print(f"wrote {args.out / 'attention_scaling.csv'} and {args.out / 'attention_scaling.png'}")


COLUMNS = [
    "n",
    "fwd_s",
    "fwdbwd_s",
    "floor_fwd_s",
    "floor_fwdbwd_s",
    "dense_fwd_s",
    "dense_fwdbwd_s",
    "fwd_mem",
    "fwdbwd_mem",
]


def _ratio(a, b):
    return None if a is None or b is None else a / b


def table(rows) -> str:
    header = ["N", "fwd s", "fwd+bwd s", "floor fwd+bwd s", "x floor (fwd / fwd+bwd)",
              "us/token fwd+bwd", "dense fwd+bwd s", "dense / dilated", "peak MiB fwd",
              "peak MiB fwd+bwd"]  # fmt: skip
    body = []
    for r in rows:
        fb, mem = r.get("fwdbwd_s"), r.get("fwdbwd_mem")
        body.append([
            f"{r['n'] // K}K", cell(r["fwd_s"], ".2f"), cell(fb, ".2f"),
            cell(r.get("floor_fwdbwd_s"), ".2f"),
            f"{cell(_ratio(r['fwd_s'], r.get('floor_fwd_s')), '.2f')} / "
            f"{cell(_ratio(fb, r.get('floor_fwdbwd_s')), '.2f')}",
            cell(None if fb is None else fb / r["n"] * 1e6, ".1f"),
            cell(r.get("dense_fwdbwd_s"), ".2f"), cell(_ratio(r.get("dense_fwdbwd_s"), fb), ".1f"),
            cell(r["fwd_mem"] / 2**20, ".0f"), cell(None if mem is None else mem / 2**20, ".0f"),
        ])  # fmt: skip
    return display.markdown_table(header, body)


def summary(rows) -> str:
    """The log-log slope of fwd+bwd time over N >= 32K: 1.0 is linear."""
    pts = [
        (math.log(r["n"]), math.log(r["fwdbwd_s"]))
        for r in rows
        if r["n"] >= 32 * K and r.get("fwdbwd_s")
    ]
    if len(pts) < 2:
        return "log-log slope: needs two sizes >= 32K with a backward"
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return f"log-log slope of fwd+bwd time, N >= 32K: {slope:.3f}"


def plot(rows, path, args):
    series = {
        "dilated fwd": "fwd_s",
        "dilated fwd+bwd": "fwdbwd_s",
        "kernel floor fwd+bwd": "floor_fwdbwd_s",
        "dense SDPA fwd+bwd": "dense_fwdbwd_s",
    }
    curves = {label: {r["n"]: r.get(key) for r in rows} for label, key in series.items()}
    title = (f"Dilated attention, paper schedule, H={args.heads} D={args.head_dim}, "
             f"{args.device.type} {str(args.dtype)[6:]}")  # fmt: skip
    display.line_plot(path, curves, "sequence length N (tokens)", "seconds (median)", title,
                      logy=True, fontsize=9)  # fmt: skip


if __name__ == "__main__":
    fixed_mmap_threshold()
    main()

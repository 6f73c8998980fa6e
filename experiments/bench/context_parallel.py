"""Context-parallel dilated attention: one sequence split across processes (the paper's
Figure 5, on this machine; the training setting is ``context_parallel``).

    python -m experiments.bench.context_parallel          # P = 1, 2, 4 at 32K-256K
    python -m experiments.bench.context_parallel --worlds 4 --sizes 1048576 --repeats 1

For each P (processes on gloo, this machine's cores split evenly among them) and N: the
paper's schedule (w = 2048..32768, r = 1, 2, 4, 6, 12), B = 1, H = 12, D = 64, fp32, causal;
each rank holds N / P tokens. Measured: forward (no grad) and forward+backward time (median
of --repeats, ranks synchronised), each rank's peak memory growth in a call of its own (the
resident set's high-water mark, as measure.py measures it), and the bytes each rank sent
and received in the call's exchanges (counted at the collectives), against the formula
``2 * B * H * D * (w' - l) / r`` elements received per pair by the last rank of a segment
(forward; the backward sends as much back). Beside it: what dense ring attention would move
for the same N and P (every rank receives the keys and values of every other rank). Writes
experiments/results/context_parallel/context_parallel{,_extended}.{csv,json,png} (or
``--name``) and prints a markdown table and the projection to the paper's setting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from experiments.bench.measure import (
    PAPER_R,
    PAPER_W,
    RESULTS,
    K,
    PeakMemory,
    fixed_mmap_threshold,
    median,
)
from models.attention import distributed
from models.attention.dilated import dilated_attention
from pipeline import display
from pipeline.provenance import write_results

NAME = "context_parallel"  # the files it writes: NAME.{csv,json,png}
HEADS, HEAD_DIM, BYTES = 12, 64, 4  # fp32


def schedule_of(name: str, n: int) -> tuple[list[int], list[int]]:
    """``paper``: w = 2048..32768, r = 1, 2, 4, 6, 12. ``extended``: w = 2048 * 4^i up to N,
    r = 4^i (each pair the same cost; the largest segment is the sequence, as in the paper's
    scaling to 1B tokens)."""
    if name == "paper":
        return PAPER_W, PAPER_R
    pairs = [(2048 * 4**i, 4**i) for i in range(16) if 2048 * 4**i < n]
    pairs.append((n, pairs[-1][1] * 4 if pairs else 1))
    return [w for w, _ in pairs], [r for _, r in pairs]


def formula_received(n: int, world: int, heads=HEADS, head_dim=HEAD_DIM, batch=1,
                     schedule: str = "paper") -> int:  # fmt: skip
    """Elements the last rank of a segment receives per forward: every spanning pair's kept
    keys and values of the segment's other ranks, 2 * B * H * D * (w' - l) / r, with l / r
    rounded up (each rank sends ceil(l / r) rows per head)."""
    length = n // world
    total = 0
    for w, r in zip(*schedule_of(schedule, n), strict=True):
        seg = min(w, n)
        if seg > length:
            sources = min(seg, n) // length - 1
            total += 2 * batch * heads * head_dim * sources * -(-length // r)
    return total


def ring_received(n: int, world: int, heads=HEADS, head_dim=HEAD_DIM, batch=1) -> int:
    """Dense ring attention: each rank receives the keys and values of the P - 1 others."""
    return 2 * batch * heads * head_dim * (n // world) * (world - 1)


def _timed(fn, repeats: int, warm_up: bool = True) -> tuple[float, int, dict]:
    """Median seconds over ranks' max, this rank's peak growth, and its exchange bytes per call.
    With ``warm_up``, memory is measured on a call of its own and the timed calls run with
    nothing measuring beside them; without (long sequences: one call), the one call does both
    (the CPU's high-water mark is read before and after, nothing runs beside it)."""
    if warm_up:
        fn()
        dist.barrier()
        with PeakMemory(torch.device("cpu")) as mem:
            fn()
    times, peak = [], mem.peak if warm_up else 0
    before = dict(distributed.EXCHANGE_BYTES)
    for _ in range(repeats):
        dist.barrier()
        with contextlib.nullcontext() if warm_up else PeakMemory(torch.device("cpu")) as mem:
            start = time.perf_counter()
            fn()
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
        if not warm_up:
            peak = max(peak, mem.peak)
    moved = {
        k: (distributed.EXCHANGE_BYTES[k] - before[k]) // repeats for k in ("sent", "received")
    }
    return median(times), peak, moved


def rank_inputs(n: int, world: int, rank: int):
    """This rank's slice shape (1, N / P, H, D), its seeded generator (the gradient is drawn
    from it after q, k, v) and random q, k, v of that shape."""
    shape = (1, n // world, HEADS, HEAD_DIM)
    gen = torch.Generator().manual_seed(rank)
    return shape, gen, [torch.randn(shape, generator=gen) for _ in range(3)]


def measure(n: int, rank: int, world: int, repeats: int, max_backward: int, schedule="paper"):
    """One size on this rank: its slice (1, N / P, H, D) of random q, k, v (above 64K tokens
    one run and no warm-up: those calls take minutes on 2 cores)."""
    repeats, warm = (repeats, True) if n <= 64 * K else (1, False)
    w, r = schedule_of(schedule, n)
    group = dist.group.WORLD
    shape, gen, qkv = rank_inputs(n, world, rank)

    def fwd():
        with torch.no_grad():
            dilated_attention(*qkv, w, r, group=group)

    row = {"P": world, "n": n, "status": "ok"}
    row["fwd_s"], row["fwd_peak"], moved = _timed(fwd, repeats, warm)
    row["fwd_sent"], row["fwd_received"] = moved["sent"], moved["received"]
    if n > max_backward:
        return row
    leaves = [x.clone().requires_grad_() for x in qkv]
    grad = torch.randn(shape, generator=gen)

    def fwd_bwd():
        dilated_attention(*leaves, w, r, group=group).backward(grad)

    row["fwdbwd_s"], row["fwdbwd_peak"], moved = _timed(fwd_bwd, repeats, warm)
    row["fwdbwd_sent"], row["fwdbwd_received"] = moved["sent"], moved["received"]
    return row


def _worker(rank: int, world: int, port: int, sizes, repeats, max_backward, threads, out,
            schedule="paper"):  # fmt: skip
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for n in sizes:
        row = measure(n, rank, world, repeats, max_backward, schedule)
        every = [None] * world
        dist.all_gather_object(every, row)
        if rank == 0:
            rows.append(_combine(every))
            print(f"  P={world} N={n // K}K: {_brief(rows[-1])}", flush=True)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _combine(per_rank: list[dict]) -> dict:
    """One row: times are the same on every rank; memory and bytes as max over ranks."""
    row = dict(per_rank[0])
    for key in row:
        if key.endswith(("_peak", "_sent", "_received")):
            row[key] = max(r[key] for r in per_rank)
    return row


def _brief(row: dict) -> str:
    parts = [f"fwd {row['fwd_s']:.2f} s"]
    if "fwdbwd_s" in row:
        parts.append(f"fwd+bwd {row['fwdbwd_s']:.2f} s")
    parts.append(f"recv/rank {row['fwd_received'] / 2**20:.1f} MiB")
    return ", ".join(parts)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, args) -> list[dict]:
    """Every size with ``world`` processes (one launch per size, so that a size the machine
    cannot hold, whose processes the kernel kills, is reported and ends that world's sizes)."""
    threads = max(1, args.cores // world)
    rows = []
    for n in args.sizes:
        out = args.out / f"rows_P{world}_N{n}.json"
        settings = ([n], args.repeats, args.max_backward, threads, str(out), args.schedule)
        try:
            mp.spawn(_worker, nprocs=world, join=True, args=(world, _free_port(), *settings))
        except mp.ProcessExitedException as err:  # SIGKILL: out of memory
            print(f"  P={world} N={n // K}K: not reached ({err})", flush=True)
            rows.append({"P": world, "n": n, "status": f"not reached: {err}"})
            break
        rows += json.loads(out.read_text())
        out.unlink()  # rank 0's hand-over, not a result
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--sizes", type=int, nargs="+", default=[32 * K, 64 * K, 128 * K, 256 * K])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-backward", type=int, default=256 * K, help="fwd only above this N")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="split among processes")
    p.add_argument("--schedule", choices=["paper", "extended"], default="paper")
    p.add_argument("--out", type=Path, default=RESULTS / NAME)
    p.add_argument("--name", help="file stem (default: context_parallel, _extended for that "
                   "schedule)")  # fmt: skip
    args = p.parse_args(argv)
    for world in args.worlds:
        bad = [n for n in args.sizes if n % world]
        if world < 1 or bad:
            p.error(f"every size must be a multiple of every world size: {bad} and P={world}")
    return args


def mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def table(rows: list[dict], schedule: str = "paper") -> str:
    header = ["P", "N", "fwd s", "fwd+bwd s", "peak MiB/rank fwd", "peak MiB/rank fwd+bwd",
              "recv MiB/rank fwd (formula)", "sent+recv MiB/rank fwd+bwd",
              "dense ring recv MiB"]  # fmt: skip
    cells = []
    for r in rows:
        if r["status"] != "ok":
            status = r["status"].replace("terminated with signal SIGKILL", "killed (SIGKILL)")
            cells.append([str(r["P"]), f"{r['n'] // K}K", status[:48]] + ["-"] * 6)
            continue
        formula = formula_received(r["n"], r["P"], schedule=schedule) * BYTES
        both = None if "fwdbwd_s" not in r else r["fwdbwd_sent"] + r["fwdbwd_received"]
        cells.append([
            str(r["P"]), f"{r['n'] // K}K", f"{r['fwd_s']:.2f}",
            "-" if "fwdbwd_s" not in r else f"{r['fwdbwd_s']:.2f}",
            mib(r["fwd_peak"]), mib(r.get("fwdbwd_peak")),
            f"{mib(r['fwd_received'])} ({mib(formula)})", mib(both),
            mib(ring_received(r["n"], r["P"]) * BYTES),
        ])  # fmt: skip
    return display.markdown_table(header, cells)


def projection() -> str:
    """Per-GPU bytes per layer (bf16, forward) for 1B tokens, B = 1, 12 heads, D = 64."""
    n = 2**30
    lines = [
        "| GPUs | tokens per GPU | paper schedule (w <= 32K) | w up to N (w = 2048 * 4^i < N, "
        "r = 4^i, last pair w = N) | dense ring attention |",
        "|---|---|---|---|---|",
    ]
    for world in (128, 256, 512, 1024):
        length = n // world
        grown = formula_received(n, world, schedule="extended")  # schedule_of's, up to w = N
        paper = formula_received(n, world)
        lines.append(f"| {world} | {length // K}K | {paper * 2 / 2**20:.0f} MiB | "
                     f"{grown * 2 / 2**20:.1f} MiB | "
                     f"{ring_received(n, world) * 2 / 2**30:.0f} GiB |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, schedule: str = "paper") -> None:
    curves = {}
    rows = [r for r in rows if r["status"] == "ok"]
    for key, label in (("fwdbwd_s", "fwd+bwd s"), ("fwd_s", "fwd s")):
        for world in sorted({r["P"] for r in rows}):
            curves[f"P={world} {label}"] = {r["n"]: r.get(key) for r in rows if r["P"] == world}
    display.line_plot(path, curves, "sequence length N (tokens)", "seconds (median)",
                      f"Context-parallel dilated attention, {schedule} schedule, H=12 D=64, "
                      "CPU gloo",
                      logy=True)  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    w, r = schedule_of(args.schedule, max(args.sizes))
    print(f"P={args.worlds} sizes={args.sizes} cores={args.cores} B=1 H={HEADS} D={HEAD_DIM} "
          f"{args.schedule} schedule (at the longest N: w={w} r={r}) causal fp32",
          flush=True)  # fmt: skip
    rows = [row for world in args.worlds for row in run_world(world, args)]
    name = args.name or (NAME if args.schedule == "paper" else f"{NAME}_{args.schedule}")
    write_results(args.out / f"{name}.json", rows)
    write_results(args.out / f"{name}.csv", rows, sorted({k for r in rows for k in r}))
    plot(rows, args.out / f"{name}.png", args.schedule)
    print(table(rows, args.schedule))
    print("\nprojection, 1B tokens (formula, bf16, per GPU and layer, forward):")
    print(projection())
    print(f"wrote {args.out}/{name}.{{csv,json,png}}")


if __name__ == "__main__":
    fixed_mmap_threshold()
    main()

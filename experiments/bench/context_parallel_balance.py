"""Context parallelism's load balance and overlap (issue #28): per-rank attention work for the
two layouts, and what leaving the exchanges in flight hides.

    python -m experiments.bench.context_parallel_balance --pairs-only   # counts, no timing
    python -m experiments.bench.context_parallel_balance                # ~10 min on 2 cores

Pairs (no timing, ``balance_pairs.csv``): attended (query, key) pairs of each rank
(``distributed.attended_pairs``, the code's own geometry, pinned to the definition by the
tests) for the paper's schedule and for segments growing to N (``--schedule extended`` of
``context_parallel.py``), at N = 32K, P = 2, 4, 8, 16, both layouts: the busiest rank over
the mean is the time a step waits for it.

Timing (``balance_timing.csv``): B = 1, H = 12, D = 64, fp32, causal, N = 32K, P processes on
gloo sharing ``--cores`` cores. Per rank, from a common barrier: its wall time and its CPU time
(``time.process_time``: the work it did, which stays meaningful when 8 processes share 2 cores
and wall times do not) for the forward and forward+backward, medians of ``--repeats``. At
``--overlap-worlds`` the forward, then the forward+backward, run alternately with the exchanges
in flight during the local calls (the default; the backward's reverse exchanges too) and waited
for where they are issued (``distributed.OVERLAP = False``), and each rank's seconds blocked
waiting for what it receives in both: where the exchange is issued (waited), where it is first
needed (in flight). Hidden fraction = 1 - blocked in flight / blocked waited (the slowest
rank's), measured directly rather than as a difference of two runs' times, which the noise of
2 shared cores swamps (``saved_over_wait`` in the file).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from experiments.bench.context_parallel import _free_port, rank_inputs, schedule_of
from experiments.bench.measure import RESULTS, K, fixed_mmap_threshold, median
from models.attention import distributed, mixing
from models.attention.dilated import dilated_attention
from pipeline import display
from pipeline.provenance import write_results

OUT = RESULTS / "context_parallel"
HEADS, HEAD_DIM = 12, 64
SCHEDULES = ("paper", "extended")


# ----------------------------------------------------------------------------------------------
# pairs (no timing)


def pair_rows(n: int = 32 * K, worlds=(2, 4, 8, 16), heads: int = HEADS) -> list[dict]:
    rows = []
    for schedule in SCHEDULES:
        pairs = tuple(zip(*schedule_of(schedule, n), strict=True))
        for world in worlds:
            for layout in distributed.LAYOUTS:
                work = distributed.attended_pairs(pairs, heads, n, world, True, layout)
                rows.append({"schedule": schedule, "n": n, "P": world, "layout": layout,
                             "pairs_min": min(work), "pairs_max": max(work),
                             "pairs_mean": sum(work) / world,
                             "max_over_mean": max(work) * world / sum(work),
                             "max_over_min": max(work) / min(work)})  # fmt: skip
    return rows


def pairs_table(rows: list[dict]) -> str:
    """Busiest rank / mean (and / least busy) by schedule, P and layout."""
    header = [
        "schedule",
        "N",
        "P",
        "contiguous: max/mean (max/min)",
        "balanced: max/mean (max/min)",
    ]
    cells, by = [], {(r["schedule"], r["P"], r["layout"]): r for r in rows}
    for schedule, world in sorted({(r["schedule"], r["P"]) for r in rows},
                                  key=lambda x: (SCHEDULES.index(x[0]), x[1])):  # fmt: skip
        both = [by[schedule, world, layout] for layout in distributed.LAYOUTS]
        ratios = [f"{r['max_over_mean']:.3f} ({r['max_over_min']:.2f})" for r in both]
        cells.append([schedule, f"{both[0]['n'] // K}K", str(world), *ratios])
    return display.markdown_table(header, cells)


# ----------------------------------------------------------------------------------------------
# timing, one launch of P processes per (schedule, P, layout)


def _per_rank(fn, repeats: int, warm_up: bool = True) -> tuple[float, float, float]:
    """This rank's median (wall s, CPU s, s blocked waiting for received rows: where the
    exchange was issued, or, in flight, where the rows are read) from a common barrier."""
    if warm_up:
        fn()
    walls, cpus, waits = [], [], []
    for _ in range(repeats):
        dist.barrier()
        wait0, cpu0, start = _blocked(), time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu0)
        waits.append(_blocked() - wait0)
    return median(walls), median(cpus), median(waits)


def _blocked() -> float:
    return distributed.EXCHANGE_WAIT_S[0] + mixing.IN_FLIGHT_WAIT_S[0]


def measure(rank: int, world: int, n: int, schedule: str, layout: str, repeats: int,
            overlap: bool) -> dict:  # fmt: skip
    w, r = schedule_of(schedule, n)
    group = dist.group.WORLD
    distributed.set_layout(group, layout)
    shape, gen, qkv = rank_inputs(n, world, rank)

    def fwd():
        with torch.no_grad():
            dilated_attention(*qkv, w, r, group=group)

    leaves = [x.clone().requires_grad_() for x in qkv]
    grad = torch.randn(shape, generator=gen)

    def fwd_bwd():
        dilated_attention(*leaves, w, r, group=group).backward(grad)

    row = {}
    for name, fn in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
        if not overlap:
            row[f"{name}_wall"], row[f"{name}_cpu"], _ = _per_rank(fn, repeats)
            continue
        on, off = [], []  # alternately, so that both see the same load
        fn()
        for _ in range(repeats):
            on.append(_per_rank(fn, 1, False))
            distributed.OVERLAP = False
            off.append(_per_rank(fn, 1, False))
            distributed.OVERLAP = True
        row[f"{name}_wall"], row[f"{name}_cpu"], row[f"{name}_wait_in_flight"] = (
            median(x[i] for x in on) for i in (0, 1, 2)
        )
        row[f"{name}_wall_waited"] = median(x[0] for x in off)
        row[f"{name}_wait"] = median(x[2] for x in off)
    return row


def _worker(rank, world, port, threads, settings, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    every = [None] * world
    dist.all_gather_object(every, measure(rank, world, **settings))
    if rank == 0:
        Path(out).write_text(repr(every))
    dist.destroy_process_group()


def combine(per_rank: list[dict], **key) -> dict:
    """One row: the slowest rank's wall times, per-rank CPU times, max over mean."""
    row = dict(key)
    for name in ("fwd", "fwdbwd"):
        row[f"{name}_s"] = max(r[f"{name}_wall"] for r in per_rank)
        cpu = [r[f"{name}_cpu"] for r in per_rank]
        row[f"{name}_cpu_by_rank"] = " ".join(f"{c:.3f}" for c in cpu)
        row[f"{name}_cpu_max_over_mean"] = max(cpu) * len(cpu) / sum(cpu)
    for name, hidden in (("fwd", "hidden_fraction"), ("fwdbwd", "fwdbwd_hidden_fraction")):
        if f"{name}_wall_waited" not in per_rank[0]:
            continue
        row[f"{name}_waited_s"] = max(r[f"{name}_wall_waited"] for r in per_rank)
        wait = row[f"{name}_wait_s"] = max(r[f"{name}_wait"] for r in per_rank)
        left = row[f"{name}_wait_in_flight_s"] = max(r[f"{name}_wait_in_flight"] for r in per_rank)
        row[hidden] = 1 - left / wait if wait > 0 else None
    if "fwd_waited_s" in row:
        saved = row["fwd_waited_s"] - row["fwd_s"]
        row["saved_over_wait"] = saved / row["fwd_wait_s"] if row["fwd_wait_s"] > 0 else None
    return row


def run(args) -> list[dict]:
    import ast

    rows = []
    for schedule in args.schedules:
        for world in args.worlds:
            for layout in args.layouts:
                overlap = world in args.overlap_worlds
                settings = dict(n=args.n, schedule=schedule, layout=layout,
                                repeats=args.repeats, overlap=overlap)  # fmt: skip
                out = args.out / f"balance_P{world}_{schedule}_{layout}.tmp"
                threads = max(1, args.cores // world)
                mp.spawn(_worker, nprocs=world, join=True,
                         args=(world, _free_port(), threads, settings, str(out)))  # fmt: skip
                per_rank = ast.literal_eval(out.read_text())
                out.unlink()
                rows.append(combine(per_rank, schedule=schedule, n=args.n, P=world, layout=layout))
                print(f"  {schedule} P={world} {layout}: {brief(rows[-1])}", flush=True)
    return rows


def brief(row: dict) -> str:
    text = (f"fwd {row['fwd_s']:.3f} s, CPU by rank {row['fwd_cpu_by_rank']} (max/mean "
            f"{row['fwd_cpu_max_over_mean']:.2f}); fwd+bwd {row['fwdbwd_s']:.3f} s")  # fmt: skip
    if row.get("fwd_waited_s") is not None:
        text += (f"; waited {row['fwd_waited_s']:.3f} s (blocked {row['fwd_wait_s']:.3f} s,"
                 f" in flight {row['fwd_wait_in_flight_s']:.3f} s)")  # fmt: skip
    if row.get("fwdbwd_waited_s") is not None:
        text += (f"; fwd+bwd blocked {row['fwdbwd_wait_s']:.3f} s waited,"
                 f" {row['fwdbwd_wait_in_flight_s']:.3f} s in flight")  # fmt: skip
    return text


def timing_table(rows: list[dict]) -> str:
    header = ["schedule", "P", "layout", "fwd s (in flight)", "fwd s (waited)",
              "blocked s: waited / in flight", "hidden", "fwd CPU s by rank", "max/mean",
              "fwd+bwd s", "fwd+bwd blocked s: waited / in flight (hidden)",
              "fwd+bwd CPU s by rank", "max/mean"]  # fmt: skip
    cells = []
    for r in rows:
        waited = r.get("fwd_waited_s") not in (None, "")
        direct = waited and r.get("fwd_wait_in_flight_s") not in (None, "")
        hidden = r.get("hidden_fraction") if direct else None  # older files: a time difference
        cells.append([
            r["schedule"], str(r["P"]), r["layout"], f"{r['fwd_s']:.3f}",
            f"{r['fwd_waited_s']:.3f}" if waited else "-",
            (f"{r['fwd_wait_s']:.3f} / {r['fwd_wait_in_flight_s']:.3f}" if direct
             else f"{r['fwd_wait_s']:.3f} / -" if waited else "-"),
            f"{hidden:.0%}" if hidden not in (None, "") else "-",
            str(r["fwd_cpu_by_rank"]), f"{r['fwd_cpu_max_over_mean']:.2f}",
            f"{r['fwdbwd_s']:.3f}", _blocked_cell(r, "fwdbwd"), str(r["fwdbwd_cpu_by_rank"]),
            f"{r['fwdbwd_cpu_max_over_mean']:.2f}",
        ])  # fmt: skip
    return display.markdown_table(header, cells)


def _blocked_cell(r: dict, name: str) -> str:
    if r.get(f"{name}_wait_in_flight_s") in (None, ""):
        return "-"
    hidden = r.get(f"{name}_hidden_fraction")
    hidden = "-" if hidden in (None, "") else f"{hidden:.0%}"
    return f"{r[f'{name}_wait_s']:.3f} / {r[f'{name}_wait_in_flight_s']:.3f} ({hidden})"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs-only", action="store_true", help="write the pair counts, no timing")
    p.add_argument("--n", type=int, default=32 * K)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--overlap-worlds", type=int, nargs="*", default=[2, 4])
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    p.add_argument("--layouts", nargs="+", choices=distributed.LAYOUTS,
                   default=list(distributed.LAYOUTS))  # fmt: skip
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="split among processes")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    bad = [world for world in args.worlds if args.n % (2 * world)]
    if bad:
        p.error(f"--n {args.n} must be a multiple of 2 x P (the balanced layout's pieces): P={bad}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = pair_rows()
    write_results(args.out / "balance_pairs.csv", rows)
    print(pairs_table(rows))
    if args.pairs_only:
        return
    print(f"N={args.n // K}K P={args.worlds} {args.schedules} {args.layouts} cores={args.cores} "
          f"B=1 H={HEADS} D={HEAD_DIM} causal fp32", flush=True)  # fmt: skip
    rows = run(args)
    write_results(args.out / "balance_timing.csv", rows, sorted({k for r in rows for k in r}))
    print(timing_table(rows))


if __name__ == "__main__":
    fixed_mmap_threshold()
    main()

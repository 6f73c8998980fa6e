"""One training step of the tiny LongNet at long N, with and without the memory savers.

    python -m experiments.bench.long_sequence                       # (make longseq)
    python -m experiments.bench.long_sequence --lengths 32768 131072 --modes plain saving

A step is what train.py does on one sequence: the LightningModule's training_step (forward and
loss), backward, an AdamW step. Modes: ``plain`` (no checkpointing, the whole N x vocab logits
in one loss chunk: the memory plain cross-entropy takes, as the loss was before #13),
``chunked`` (the chunked output layer and loss only), ``saving`` (chunked loss and
``model.checkpointing=layer``) and ``sublayer`` (chunked loss and
``model.checkpointing=sublayer``). The step time is the median of ``--repeats`` steps up to
128K tokens (the first included: a step at long N is dominated by work, not warm-up), one
step beyond. Each (N, mode) runs in its own process, so that its peak
memory (growth of the resident set's high-water mark above the process after building the
model; see measure.py) is its own, and a length the machine cannot hold (the kernel kills the
process) is reported as not reached rather than ending the run. Prints a markdown table of
peak MiB per token and tokens/s; writes experiments/results/long_sequence/longseq.json.

Then an estimate (``estimate``; ``--estimate-only`` redoes it from a saved json): how long a
sequence larger configs train on one GPU, from the measured per-token figures scaled by width,
depth and vocabulary. The measured bytes per token are split by what each mode keeps:

- ``chunked`` (nothing recomputed): all of it scales with depth x width;
- ``plain``: ``chunked`` plus the logits, (plain - chunked) / V bytes per vocabulary entry;
- ``saving`` keeps one fp32 value per width unit per layer (the block inputs), ``sublayer``
  two (the branch inputs); the rest (one layer's recomputation, the embedding and the final
  norm) scales with width only.

Activations are counted in fp32, as measured here (bf16 autocast stores some of them in half
the bytes: the estimate is conservative); the model's state is 16 bytes per parameter (fp32
weights, gradients and AdamW's two moments), and one loss chunk's logits (``chunk x V`` x 4
bytes, twice) is reserved.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import torch

from experiments.bench.measure import (
    RESULTS,
    K,
    PeakMemory,
    fixed_mmap_threshold,
    language_model,
    median,
    train_step,
    window,
)
from pipeline import display
from pipeline.provenance import rows_of, write_results
from settings.loading import model_config_named

MODES = ("plain", "chunked", "saving", "sublayer")


def _measure(n: int, mode: str, model_name: str, chunk: int, threads: int, repeats: int,
             queue) -> None:  # fmt: skip
    import dataclasses

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = model_config_named(model_name)
    recompute = {"saving": "layer", "sublayer": "sublayer"}.get(mode, "none")
    cfg = dataclasses.replace(cfg, checkpointing=recompute)
    module = language_model(cfg, loss_chunk=n if mode == "plain" else chunk)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = window(torch.randint(0, cfg.vocab_size, (1, n + 1)))
    seconds = []
    with PeakMemory(torch.device("cpu")) as mem:
        for _ in range(repeats):
            start = time.perf_counter()
            loss = train_step(module, optimizer, batch)
            seconds.append(time.perf_counter() - start)
    queue.put({"n": n, "mode": mode, "status": "ok", "step_s": float(median(seconds)),
               "steps": len(seconds), "loss": loss, "peak_mib": mem.peak / 2**20})  # fmt: skip


def measure(n: int, mode: str, args) -> dict:
    """One (N, mode) in a fresh process; a killed process is a length not reached."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    repeats = args.repeats if n <= args.repeat_up_to else 1
    proc = ctx.Process(
        target=_measure, args=(n, mode, args.model, args.chunk, args.threads, repeats, queue)
    )
    proc.start()
    proc.join()
    if proc.exitcode != 0 or queue.empty():
        return {"n": n, "mode": mode, "status": f"not reached (exit {proc.exitcode})"}
    row = queue.get()
    row["mib_per_token"] = row["peak_mib"] / n
    row["tokens_per_s"] = n / row["step_s"]
    return row


def table(rows: list[dict]) -> str:
    header = ["N", "mode", "status", "step s", "tokens/s", "peak MiB", "MiB/token"]
    cells = [
        [f"{r['n'] // K}K", r["mode"], r["status"], r.get("step_s"), r.get("tokens_per_s"),
         r.get("peak_mib"), r.get("mib_per_token")]
        for r in rows
    ]  # fmt: skip
    return display.markdown_table(header, cells, digits=3)


def coefficients(rows: list[dict], model_name: str) -> dict[str, tuple[float, float]]:
    """``mode -> (bytes per token per layer per width unit, bytes per token per width unit)``
    and ``"logits" -> (bytes per token per vocabulary entry, 0)``, from the longest N each mode
    reached (see the module docstring)."""
    cfg = model_config_named(model_name)
    L, d, V = cfg.n_layer, cfg.d_model, cfg.vocab_size
    best = {}
    for r in sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["n"]):
        best[r["mode"]] = r  # the longest N reached
    per_token = {mode: r["peak_mib"] * 2**20 / r["n"] for mode, r in best.items()}
    out = {}
    if "chunked" in per_token:
        out["chunked"] = (per_token["chunked"] / (L * d), 0.0)
        same_n = [r for r in rows if r["status"] == "ok" and r["mode"] in ("plain", "chunked")]
        by_n = {}
        for r in same_n:
            by_n.setdefault(r["n"], {})[r["mode"]] = r["peak_mib"] * 2**20 / r["n"]
        pairs = [v for _, v in sorted(by_n.items()) if len(v) == 2]
        if pairs:  # logits: plain - chunked at the longest N both reached
            out["logits"] = ((pairs[-1]["plain"] - pairs[-1]["chunked"]) / V, 0.0)
    for mode, kept in (("saving", 4.0), ("sublayer", 8.0)):
        if mode in per_token:
            out[mode] = (kept, per_token[mode] / d - L * kept)
    return out


def estimate(rows: list[dict], model_name: str, targets: list[str], gpu_bytes: float,
             chunk: int) -> str:  # fmt: skip
    """A markdown table: per-token KiB and the longest N that fits ``gpu_bytes`` for each
    target config and mode (see the module docstring)."""
    from models.transformer import n_params

    coef = coefficients(rows, model_name)
    header = ["config", "params", "state GiB", "mode", "KiB/token", "longest N"]
    cells = []
    for name in targets:
        cfg = model_config_named(name)
        L, d, V = cfg.n_layer, cfg.d_model, cfg.vocab_size
        params = n_params(cfg)
        reserved = 16 * params + 2 * 4 * chunk * V
        for mode in ("plain", "chunked", "saving", "sublayer"):
            source = "chunked" if mode == "plain" else mode
            if source not in coef or (mode == "plain" and "logits" not in coef):
                continue
            per_layer, fixed = coef[source]
            per_token = L * d * per_layer + d * fixed
            if mode == "plain":
                per_token += V * coef["logits"][0]
                reserved -= 2 * 4 * chunk * V  # no chunk: the logits are in per_token
            longest = max(0.0, gpu_bytes - reserved) / per_token
            cells.append([name, f"{params / 1e6:.0f}M", 16 * params / 2**30, mode,
                          per_token / 2**10, f"{longest / K:.0f}K"])  # fmt: skip
    return display.markdown_table(header, cells, digits=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32 * K, 128 * K, 512 * K, 1024 * K])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--model", default="longnet_tiny", help="a name in configs/model/")
    p.add_argument("--chunk", type=int, default=8192, help="loss_chunk: tokens per chunk")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3, help="steps timed (median) at N <= ...")
    p.add_argument("--repeat-up-to", type=int, default=128 * K, help="... this; longer: one")
    p.add_argument("--out", type=Path, default=RESULTS / "long_sequence")
    p.add_argument("--targets", nargs="+", default=["longnet_base", "longnet_2_7b"],
                   help="configs in configs/model/ to estimate for")  # fmt: skip
    p.add_argument("--gpu-gb", type=float, default=141.0, help="GPU memory, 1e9 bytes")
    p.add_argument("--estimate-only", action="store_true",
                   help="redo the estimate from OUT/longseq.json, measuring nothing")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.estimate_only:
        rows = rows_of(args.out / "longseq.json")
        print(estimate(rows, args.model, args.targets, args.gpu_gb * 1e9, args.chunk))
        return
    rows, stopped = [], set()
    for n in sorted(args.lengths):
        for mode in args.modes:
            if mode in stopped:  # a shorter N was not reached: a longer one will not be
                rows.append({"n": n, "mode": mode, "status": "skipped"})
                continue
            row = measure(n, mode, args)
            rows.append(row)
            print(f"  N={n // K}K {mode}: {row['status']}" + (
                f", {row['step_s']:.1f} s, {row['mib_per_token']:.4f} MiB/token"
                if row["status"] == "ok" else ""), flush=True)  # fmt: skip
            if row["status"] != "ok":
                stopped.add(mode)
    write_results(args.out / "longseq.json", rows)
    print(table(rows))
    print(f"wrote {args.out}/longseq.json\n\nestimate for one {args.gpu_gb:.0f} GB GPU:")
    print(estimate(rows, args.model, args.targets, args.gpu_gb * 1e9, args.chunk))


if __name__ == "__main__":
    fixed_mmap_threshold()
    main()

"""One command for the first GPU that comes: `make gpu-check` (about 8 minutes on one GPU).

    python -m experiments.tools.gpu_check [--out runs/gpu-check] [--only tests bench train]

1. tests: the `gpu`-marked tests (every attention pattern, forward and gradients against the
   float64 references, fp32/bf16/fp16, torch's kernels and flash-attn when installed);
2. bench: dilated attention (the paper's schedule, B=1, H=12, D=64, bf16) against dense SDPA
   at 32K-1M tokens: forward and forward+backward time, peak memory;
3. train: 200 steps of configs/model/longnet_base.yaml at 32K tokens per step, bf16-mixed, on
   the embedded stdlib corpus: tokens/s, step time, loss, peak memory, model FLOPs utilisation;
4. multi: with more than one GPU visible, context parallelism on NCCL
   (tests/test_context_parallel_gpu.py: the split attention against one GPU, float32 and
   bf16, both layouts, with exchanges where ranks send or receive nothing: no zero-sized
   message is posted, distributed._send_recv says why); said to be skipped otherwise.

Each stage has a time budget; one that runs out, or fails, is reported as such and the next
one runs. Uses the Python it is started with and whatever is installed there (torch version,
flash-attn or not, and says so). Writes runs/gpu-check/report.md (device, versions, every
number) and prints it. Refuses on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from experiments.bench import attention_scaling
from models.attention.backends import flash_attn_version, resolve_backend
from pipeline.display import markdown_table

ROOT = Path(__file__).resolve().parents[2]
K = 1024
STAGES = ("tests", "bench", "train", "multi")
BUDGET_S = {"tests": 120, "bench": 170, "train": 170, "multi": 120}
BENCH_SIZES = [32 * K, 64 * K, 128 * K, 256 * K, 512 * K, 1024 * K]
TRAIN_STEPS, TRAIN_LEN = 200, 32 * K
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # bf16 dense
TRAIN_NEEDS = ("lightning", "omegaconf", "datasets", "tokenizers")
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def refuse_without_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit(
            f"gpu-check needs a CUDA GPU: torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda or 'none'}) reports torch.cuda.is_available() = False. "
            "Run it on a machine with an NVIDIA GPU; `make test` is the CPU suite."
        )


def environment() -> dict:
    dev = torch.cuda.get_device_properties(0)
    probe = torch.empty(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    missing = [m for m in TRAIN_NEEDS if importlib.util.find_spec(m) is None]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{dev.name}, {dev.total_memory / 2**30:.0f} GiB, "
        f"{dev.multi_processor_count} SMs, sm{dev.major}{dev.minor}",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()})",
        "flash-attn": flash_attn_version() or "not installed (torch's kernels are used)",
        "kernel for bf16, head_dim 64": resolve_backend("auto", probe),
        "python": platform.python_version(),
        "packages missing for training": ", ".join(missing) or "none",
    }


# ----------------------------------------------------------------------------------------------
# stages


def run_multi_gpu(budget: float) -> dict:
    """The multi-GPU stage, or why it was skipped."""
    count = torch.cuda.device_count()
    if count < 2:
        return {"status": f"skipped: {count} GPU visible, context parallelism needs 2 or more"}
    return run_tests(budget, "tests/test_context_parallel_gpu.py")


def run_tests(budget: float, path: str = "tests/test_gpu.py") -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           path]  # fmt: skip
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {budget:.0f} s"}
    lines = (res.stdout + res.stderr).strip().splitlines()
    summary = next((ln for ln in reversed(lines) if re.search(r"passed|failed|error", ln)), "")
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR", "SKIPPED"))]
    return {"status": "ok" if res.returncode == 0 else f"exit {res.returncode}",
            "summary": summary.strip("= "), "details": failures[:40]}  # fmt: skip


def run_bench(budget: float, sizes=BENCH_SIZES, device="cuda", dtype="bfloat16") -> dict:
    args = attention_scaling.parse_args(
        [
            "--sizes",
            *map(str, sizes),
            "--repeats",
            "3",
            "--max-backward",
            str(max(sizes)),
            "--dense-max",
            str(512 * K),
            "--device",
            device,
            "--dtype",
            dtype,
        ]  # fmt: skip
    )
    rows, start, status = [], time.perf_counter(), "ok"
    for n in sizes:
        if time.perf_counter() - start > budget:
            status = f"stopped at the {budget:.0f} s budget before N={n // K}K"
            break
        row = {"n": n}
        try:
            row.update(attention_scaling.dilated_runs(n, args))
            if n <= args.dense_max:
                row.update(attention_scaling.dense_runs(n, args))
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
        rows.append(row)
        torch.cuda.empty_cache() if device == "cuda" else None
    return {"status": status, "rows": rows, "backend": args.backend}


def train_command(run_dir: Path, steps: int = TRAIN_STEPS, seq_len: int = TRAIN_LEN,
                  model: str = "configs/model/longnet_base.yaml") -> list[str]:  # fmt: skip
    return [
        sys.executable, "train.py", model, f"run_dir={run_dir}", "resume=null",
        "validate_first=false", f"data.seq_len={seq_len}", "data.batch_size=1",
        "data.vocab_size=32768", "model.vocab_size=null",
        "data.num_workers=4", f"trainer.max_steps={steps}", "trainer.precision=bf16-mixed",
        f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=4",
        "trainer.log_every_n_steps=1", "optim.warmup_steps=20", "checkpoint.every_n_steps=100000",
    ]  # fmt: skip


def run_train(budget: float, out: Path) -> dict:
    missing = [m for m in TRAIN_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": f"skipped: not installed: {', '.join(missing)} (pip install -e .)"}
    run_dir = out / "train"
    start = time.perf_counter()
    try:
        res = subprocess.run(train_command(run_dir), cwd=ROOT, capture_output=True, text=True,
                             timeout=budget, env=OFFLINE)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {budget:.0f} s", **train_metrics(run_dir)}
    status = (
        "ok"
        if res.returncode == 0
        else f"exit {res.returncode}: "
        + ((res.stderr or res.stdout).strip().splitlines() or [""])[-1]
    )
    return {"status": status, "wall_s": time.perf_counter() - start, **train_metrics(run_dir)}


def train_metrics(run_dir: Path) -> dict:
    """Per-step numbers from the run's metrics CSV (steps after warm-up: the last 90%)."""
    import statistics

    from pipeline.outputs import metrics_rows

    rows = [r for r in metrics_rows(run_dir) if r.get("train/tokens_per_s")]
    if not rows:
        return {}
    steady = rows[len(rows) // 10 :] or rows
    tps = statistics.median(float(r["train/tokens_per_s"]) for r in steady)
    return {
        "steps": int(rows[-1]["step"]) + 1,
        "tokens_per_s": tps,
        "step_s": TRAIN_LEN / tps,
        "loss_first": float(rows[0]["train/loss"]),
        "loss_last": float(rows[-1]["train/loss"]),
        "peak_gib": max(float(r["train/peak_mem_gb"]) for r in rows),
    }


def mfu(tokens_per_s: float, device_name: str) -> str:
    from models.transformer import flops_per_token
    from settings.loading import model_config_named

    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    if peak is None:
        return "n/a (unknown peak)"
    flops = flops_per_token(model_config_named("longnet_base"), TRAIN_LEN) * tokens_per_s
    return f"{100 * flops / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s"


# ----------------------------------------------------------------------------------------------
# the report


def report(env: dict, results: dict, seconds: float) -> str:
    lines = ["# gpu-check", ""]
    lines += [markdown_table(["", ""], [*env.items(), ("total time", f"{seconds:.0f} s")]), ""]
    if "tests" in results:
        t = results["tests"]
        lines += ["## GPU tests (tests/test_gpu.py)", "", f"{t['status']}: {t.get('summary', '')}"]
        lines += ["", *[f"    {d}" for d in t.get("details", [])], ""]
    if "multi" in results:
        t = results["multi"]
        lines += ["## Context parallelism on NCCL (tests/test_context_parallel_gpu.py)", "",
                  f"{t['status']}: {t.get('summary', '')}"]  # fmt: skip
        lines += ["", *[f"    {d}" for d in t.get("details", [])], ""]
    if "bench" in results:
        b = results["bench"]
        title = f"## Attention: paper schedule, B=1, H=12, D=64, bf16, backend {b.get('backend')}"
        lines += [title, "", b["status"], "", attention_scaling.table(b["rows"]), ""]
        lines += [f"N={r['n'] // K}K: {r['note']}" for r in b["rows"] if r.get("note")]
        lines += [attention_scaling.summary(b["rows"]), ""]
    if "train" in results:
        t = results["train"]
        lines += [f"## Training: longnet_base, {TRAIN_LEN // K}K tokens/step, bf16-mixed", "",
                  t["status"], ""]  # fmt: skip
        if "tokens_per_s" in t:
            header = ["steps", "tokens/s (median)", "s/step", "loss first -> last", "peak GiB",
                      "MFU"]  # fmt: skip
            row = [str(t["steps"]), f"{t['tokens_per_s']:.0f}", f"{t['step_s']:.3f}",
                   f"{t['loss_first']:.3f} -> {t['loss_last']:.3f}", f"{t['peak_gib']:.1f}",
                   mfu(t["tokens_per_s"], env["device"])]  # fmt: skip
            lines += [markdown_table(header, [row]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    p.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES))
    args = p.parse_args(argv)
    refuse_without_cuda()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    env, results = environment(), {}
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    for stage in args.only:
        print(f"-- {stage} (budget {BUDGET_S[stage]} s)", flush=True)
        if stage == "tests":
            results[stage] = run_tests(BUDGET_S[stage])
        elif stage == "bench":
            results[stage] = run_bench(BUDGET_S[stage])
        elif stage == "multi":
            results[stage] = run_multi_gpu(BUDGET_S[stage])
        else:
            results[stage] = run_train(BUDGET_S[stage], args.out)
        (args.out / "report.md").write_text(report(env, results, time.perf_counter() - start))
    text = report(env, results, time.perf_counter() - start)
    (args.out / "report.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

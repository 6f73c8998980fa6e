"""`make gpu-check` on this CPU: it refuses without CUDA; its parts run (the benchmark on tiny
CPU sizes), its training command passes the config checks, its report holds every number."""

import pytest
import torch

from experiments.tools import gpu_check
from pipeline.build import model_config
from settings.loading import load_run_config, split_argv


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="gpu-check needs a CUDA GPU"):
        gpu_check.main(["--out", str(tmp_path)])
    assert not (tmp_path / "report.md").exists()


def test_training_command_passes_the_config_checks(tmp_path):
    cmd = gpu_check.train_command(tmp_path / "train")
    cfg = load_run_config(*split_argv(cmd[2:]))
    assert cfg.data.seq_len == 32768 and cfg.trainer["max_steps"] == 200
    assert cfg.trainer["precision"] == "bf16-mixed"
    model = model_config(cfg, vocab_size=cfg.data.vocab_size)
    assert (model.d_model, model.n_layer, model.n_head) == (768, 12, 12)


def test_benchmark_stage_runs(monkeypatch):
    """The stage's own call of the attention benchmark, at sizes a CPU runs in a second (the
    sizes only scale the work: 1024 and 2048 took 7 s of the fast suite)."""
    res = gpu_check.run_bench(60, sizes=[256, 512], device="cpu", dtype="float32")
    assert res["status"] == "ok" and [r["n"] for r in res["rows"]] == [256, 512]
    assert all(r["fwdbwd_s"] > 0 and r["dense_fwdbwd_s"] > 0 for r in res["rows"])


def test_report_holds_every_number(tmp_path):
    log = tmp_path / "logs" / "version_0"
    log.mkdir(parents=True)
    rows = ["step,train/loss,train/tokens_per_s,train/peak_mem_gb"]
    rows += [f"{s},{10 - s / 100:.2f},{30000 + s},{40.5}" for s in range(200)]
    (log / "metrics.csv").write_text("\n".join(rows) + "\n")
    train = {"status": "ok", **gpu_check.train_metrics(tmp_path)}
    assert train["steps"] == 200 and train["loss_first"] == 10.0 and train["peak_gib"] == 40.5
    results = {
        "tests": {"status": "ok", "summary": "68 passed in 30.1s", "details": []},
        "bench": {"status": "ok", "backend": "torch", "rows": [
            {"n": 32768, "fwd_s": 0.01, "fwd_mem": 2**30, "fwdbwd_s": 0.03, "fwdbwd_mem": 2**31,
             "dense_fwd_s": 0.02, "dense_fwdbwd_s": 0.09}]},
        "train": train,
    }  # fmt: skip
    env = {"device": "NVIDIA H200, 139 GiB, 132 SMs, sm90", "torch": "2.11.0"}
    text = gpu_check.report(env, results, 400.0)
    for needle in ("NVIDIA H200", "68 passed", "| 32K | 0.01 | 0.03 |", "| 200 | 30", "MFU",
                   "% of 989 TFLOP/s", "10.000 -> 8.010", "total time | 400 s"):  # fmt: skip
        assert needle in text, needle


def test_multi_gpu_stage_says_when_it_is_skipped(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    res = gpu_check.run_multi_gpu(10)
    assert res["status"] == "skipped: 1 GPU visible, context parallelism needs 2 or more"
    text = gpu_check.report({"device": "one"}, {"multi": res}, 1.0)
    assert "Context parallelism on NCCL" in text and "skipped: 1 GPU visible" in text

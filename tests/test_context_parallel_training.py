"""Training with each window split across ranks (context_parallel) is training on the whole
window: per-step losses and validation perplexity equal those of the run without the split."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.outputs import metric
from pipeline.training import train
from settings.loading import ConfigError, load_run_config

ROOT = Path(__file__).resolve().parents[1]
# segments of 8 stay inside a slice of 16; the 32 one spans both ranks of a pair
SPLIT = ["model.segment_lengths=[8,32]", "model.dilation_rates=[1,2]", "model.dropout=0.0",
         "trainer.max_steps=5", "trainer.val_check_interval=5",
         "trainer.limit_val_batches=2"]  # fmt: skip


def launch(args: list[str], devices: int) -> None:
    """train.py in its own processes, DDP on CPU (gloo), as a user would start it."""
    cmd = [sys.executable, "train.py", *args, "trainer.strategy=ddp", "trainer.accelerator=cpu",
           f"trainer.devices={devices}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = metric(a, "train/loss"), metric(b, "train/loss")
    assert sorted(la) == sorted(lb) and len(la) == 5
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5), (step, la[step], lb[step])
    va, vb = metric(a, "val/ppl"), metric(b, "val/ppl")
    assert va and va.keys() == vb.keys()
    assert all(va[s] == pytest.approx(vb[s], rel=1e-5) for s in va)


def test_split_windows_train_as_whole_ones(tiny_args, tmp_path):
    """2 processes splitting each window = 1 process with the whole window."""
    train(tiny_args(tmp_path / "one", *SPLIT))
    launch(tiny_args(tmp_path / "split", *SPLIT, "context_parallel=2"), devices=2)
    assert_same_run(tmp_path / "one", tmp_path / "split")


@pytest.mark.slow
def test_data_times_context_parallel(tiny_args, tmp_path):
    """4 processes as 2 data-parallel groups of 2 splitting ranks = 2 data-parallel processes."""
    launch(tiny_args(tmp_path / "dp", *SPLIT), devices=2)
    launch(tiny_args(tmp_path / "dpcp", *SPLIT, "context_parallel=2"), devices=4)
    assert_same_run(tmp_path / "dp", tmp_path / "dpcp")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["context_parallel=2", "model.attention=dense"], "dilated attention only"),
        (["context_parallel=3"], r"data.seq_len=2048 must be a multiple of context_parallel=3"),
        (["context_parallel=0"], "must be >= 1"),
    ],
)
def test_bad_context_parallel(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config([], overrides)

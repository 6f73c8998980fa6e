"""Training with each window split across ranks (context_parallel) is training on the whole
window: per-step losses, validation perplexity and bits per byte equal those of the run without
the split.

The fast test's ranks are forked from the preloaded server (tests/support/forkserver.py) and
find the variables torchrun sets, so Lightning makes the group as it does under torchrun: a
train.py launch (Lightning starting a second interpreter that imports torch and Lightning
again) cost 20-30 s on two loaded cores. That launch, as a user starts it, is kept by the slow
data x context parallel test."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.outputs import metric
from pipeline.training import train
from settings.loading import ConfigError, load_run_config
from tests.support.context_parallel_cases import train_rank, training_step_equivalences
from tests.support.distributed import spawn

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
    for name in ("val/ppl", "val/bpb"):  # bpb: each rank's bytes of its slice, summed
        va, vb = metric(a, name), metric(b, name)
        assert va and va.keys() == vb.keys()
        assert all(va[s] == pytest.approx(vb[s], rel=1e-5) for s in va)


def test_split_windows_train_as_whole_ones(tiny_args, tmp_path):
    """2 processes splitting each window = 1 process with the whole window, in each layout
    (the layout set from the config on the group Lightning's setup makes)."""
    train(tiny_args(tmp_path / "one", *SPLIT))
    ddp = ["trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    for layout in ("contiguous", "balanced"):
        split = tmp_path / layout
        args = tiny_args(split, *SPLIT, *ddp, "context_parallel=2",
                         f"context_parallel_layout={layout}")  # fmt: skip
        spawn(train_rank, 2, args, timeout=120, init=False)
        assert_same_run(tmp_path / "one", split)


def test_one_optimizer_step_equals_the_whole_window():
    """CausalLM, 2 processes splitting each window vs 1 with the whole window, float64:
    every gradient and parameter after one AdamW step equal within 1e-6 relative, without
    and with activation checkpointing (whose recomputation re-runs the exchanges), a slice
    with no scored target included. Mutation: without the P factor of each slice's loss the
    gradients are off by 1/P and the check sees it (losses alone, under AdamW, barely would).
    The balanced layout (pieces 0 and 3 on rank 0, 1 and 2 on rank 1: data, labels and
    positions permuted alike) likewise, with and without recomputation. Then, in the same
    group: with dropout the slices of a window draw their own masks."""
    spawn(training_step_equivalences, 2, timeout=180)


@pytest.mark.slow
def test_data_times_context_parallel(tiny_args, tmp_path):
    """4 processes as 2 data-parallel groups of 2 splitting ranks = 2 data-parallel processes,
    each run launched by train.py as a user starts it (Lightning starting the other ranks)."""
    launch(tiny_args(tmp_path / "dp", *SPLIT), devices=2)
    launch(tiny_args(tmp_path / "dpcp", *SPLIT, "context_parallel=2"), devices=4)
    assert_same_run(tmp_path / "dp", tmp_path / "dpcp")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["context_parallel=2", "model.attention=dense"], "dilated attention only"),
        (["context_parallel=3"], r"data.seq_len=2048 must be a multiple of context_parallel=3"),
        (["context_parallel=0"], "must be >= 1"),
        (["context_parallel=2", "trainer.use_distributed_sampler=true"], "read the same window"),
        (["context_parallel=2", "model.stretch_last=true"], "stretch_last=true widens"),
        (["context_parallel=2", "context_parallel_layout=zigzag"], r"not one of \('contiguous'"),
        (
            ["context_parallel=3", "data.seq_len=2043", "context_parallel_layout=balanced"],
            "multiple of 2 x context_parallel=3",
        ),
    ],
)
def test_bad_context_parallel(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config([], overrides)

"""Context parallelism where one rank can fail alone: every rank of the group learns of it
before any collective, nobody waits forever (each test runs under a timeout, so that a
regression fails instead of hanging), and the run goes on."""

from pathlib import Path

import pytest
import torch

from pipeline.training import train
from tests.support.distributed import spawn
from tests.support.runs import tiny_run
from tests.test_eval import write_long_documents

TIMEOUT = 120  # seconds: gloo's collective timeout and the processes' deadline


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.support.corpus import write_corpus

    root = tmp_path_factory.mktemp("cp_faults")
    write_corpus(root / "corpus")
    write_long_documents(root / "corpus")
    overrides = ["trainer.max_steps=2", "data.val_fraction=0.3", "data.test_fraction=0.3"]
    train(tiny_run(root, root / "run", *overrides))
    return str(root / "run" / "checkpoints" / "last.ckpt")


def eval_with_oom(rank, world, ckpt, out_dirs):
    """eval.py's work on 2 ranks, once per failing rank (``out_dirs[i]``: rank i fails), in one
    group: the second run also shows the group still aligned after the first. The failing
    rank runs out of memory in the feed-forward of the first layer at length 16 (slices of 8),
    after that layer's exchange and before the second's: the other rank is then already on
    its way into the next exchange."""
    import models.transformer as T
    from pipeline.evaluation import evaluate

    original = T.FeedForward.forward
    failing = {"rank": None}

    def forward(self, x):
        if rank == failing["rank"] and x.shape[1] == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, x)

    T.FeedForward.forward = forward
    for failing_rank, out_dir in enumerate(out_dirs):
        failing["rank"] = failing_rank
        args = [f"checkpoints=[{ckpt}]", "context_lengths=[16,64]", "split=val", "suffix=8",
                f"out_dir={out_dir}", "context_parallel=2", "span_windows=0"]  # fmt: skip
        (result,) = evaluate(args)
        at, where = result.lengths, f"rank {failing_rank} failing"
        assert at[16].ppl is None and at[16].reason == "not reached: out of memory", (where, at)
        assert at[64].ppl is not None and at[64].tokens > 0, (where, at[64])  # went on, aligned
        assert (
            result.prompting[64] == result.prompting[64]
            and result.prompting[16] != (result.prompting[16])
        ), where  # NaN where the prompt of 16 ran out of memory on one rank


def test_out_of_memory_on_either_rank_is_shared(ckpt, tmp_path):
    """Rank 0 failing, then rank 1, in one process group (a group per case cost seconds)."""
    out_dirs = [str(tmp_path / f"out{rank}") for rank in (0, 1)]
    spawn(eval_with_oom, 2, ckpt, out_dirs, timeout=TIMEOUT)
    for out_dir in out_dirs:
        csv = (Path(out_dir) / "ppl_vs_context.csv").read_text()
        assert "not reached: out of memory" in csv, out_dir

"""Context parallelism where one rank can fail alone: every rank of the group learns of it
before any collective, nobody waits forever (each test runs under a timeout, so that a
regression fails instead of hanging), and the run goes on."""

from pathlib import Path

import pytest

from pipeline.training import train
from tests.support.context_parallel_cases import eval_with_oom
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


def test_out_of_memory_on_either_rank_is_shared(ckpt, tmp_path):
    """Rank 0 failing, then rank 1, in the contiguous layout and then the balanced one (whose
    exchanges at length 16 differ: both pairs span ranks), in one process group (a group per
    case cost seconds)."""
    runs = [(layout, rank, str(tmp_path / f"{layout}{rank}"))
            for layout in ("contiguous", "balanced") for rank in (0, 1)]  # fmt: skip
    spawn(eval_with_oom, 2, ckpt, runs, timeout=TIMEOUT)
    for _, _, out_dir in runs:
        csv = (Path(out_dir) / "ppl_vs_context.csv").read_text()
        assert "not reached: out of memory" in csv, out_dir

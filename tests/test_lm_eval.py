"""The lm-evaluation-harness model ``longnet`` (pipeline/lm_eval_model.py) on a local task, offline:
its rolling log-likelihood equals eval.py's NLL with ``window=rolling``, and lm-eval's bits per
byte equals eval.py's."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # trains a run and loads lm-eval: about 35 s on 2 cores

from data.corpus import Split  # noqa: E402
from pipeline import scoring as sc  # noqa: E402
from pipeline.lm_eval_model import LongNetLM  # noqa: E402
from pipeline.training import train  # noqa: E402
from tests.support.corpus import write_corpus  # noqa: E402
from tests.support.runs import tiny_run  # noqa: E402

TEXTS = [
    "The adapter scores whole texts in rolling windows. " * 6,
    "Short one: naïve café.",
    "def f(x):\n    return x * 2\n" * 9,
]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    write_corpus(root / "corpus")
    run_dir = root / "run"
    train(tiny_run(root, run_dir, "trainer.max_steps=1", "model.attention=dense"))
    return LongNetLM(checkpoint=str(run_dir / "checkpoints" / "last.ckpt"), max_length=16)


class Req:
    def __init__(self, *args):
        self.args = args


def eval_py_rolling(lm: LongNetLM, texts):
    """eval.py's measure(window=rolling) over the same texts tokenized the same way."""
    ids = [lm.tok.encode(t).ids for t in texts]
    flat = np.concatenate([np.append(i, lm.eod) for i in ids]).astype(np.int64)
    lengths = np.asarray([len(i) for i in ids])
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    split = Split(flat, starts, lengths, [str(i) for i in range(len(texts))])
    sc.corpus_split(lm.model, "test")  # sets the byte table and start token
    return sc.measure(lm.model, split, range(len(texts)), lm.max_length, 4096,
                      torch.device("cpu"), window="rolling")  # fmt: skip


def test_rolling_loglikelihood_equals_eval_py_rolling(adapter):
    lm_eval_nll = -sum(adapter.loglikelihood_rolling([Req(t) for t in TEXTS]))
    ours = eval_py_rolling(adapter, TEXTS)
    assert ours.bytes == sum(len(t.encode()) for t in TEXTS)
    assert ours.nll == pytest.approx(lm_eval_nll, rel=1e-6)


def test_loglikelihood_and_generation(adapter):
    ((ll, greedy),) = adapter.loglikelihood([Req("The adapter", " scores")])
    assert ll < 0 and isinstance(greedy, bool)
    (text,) = adapter.generate_until([Req("def f(x):", {"until": ["\n\n"], "max_gen_toks": 8})])
    assert isinstance(text, str) and "\n\n" not in text


def test_a_local_task_reports_eval_pys_bits_per_byte(adapter, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "tiny.yaml").write_text(
        "task: tiny_rolling\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n  - metric: byte_perplexity\n"
    )
    out = simple_evaluate(model=adapter, tasks=["tiny_rolling"],
                          task_manager=TaskManager(include_path=str(tmp_path)))  # fmt: skip
    got = out["results"]["tiny_rolling"]["bits_per_byte,none"]
    ours = eval_py_rolling(adapter, TEXTS)
    assert got == pytest.approx(ours.nll / ours.bytes / math.log(2), rel=1e-6)

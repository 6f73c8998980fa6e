"""Shared fixtures: the tests' corpus (text they write) and run arguments built from the real
configs (configs/debug/tiny.yaml: the smallest run that exercises everything)."""

import gc
import os
import sys

import pytest
import torch

from tests.support.corpus import write_corpus
from tests.support.runs import tiny_run

# Tests never touch the network: Hugging Face libraries must use local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_finish(session):
    """What collection imported (half a million objects of torch, Lightning, transformers and
    the test modules) lives to the end: frozen out of the cyclic collector's reach, so that
    every full collection (Python's own, and gc.collect() in the benchmarks) stops scanning
    it, a third of a second each. The collected tests that start processes import
    tests/support/forkserver.py: its server starts now, importing torch and Lightning beside
    the first tests instead of in the first test that forks."""
    gc.collect()
    gc.freeze()
    if "tests.support.forkserver" in sys.modules and not session.config.option.collectonly:
        sys.modules["tests.support.forkserver"].start()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory holding ``corpus/`` (80 written documents) and room for its ``cache/``."""
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "corpus", n_docs=80)
    return root


@pytest.fixture
def tiny_args(corpus):
    """``tiny_args(run_dir, *overrides)``: train.py arguments of a tiny run on ``corpus``."""
    return lambda run_dir, *extra: tiny_run(corpus, run_dir, *extra)

"""Child processes for tests that start in milliseconds instead of seconds.

A fresh interpreter spends seconds importing torch and Lightning (Lightning pulls in
torchmetrics, transformers and scipy): that import was most of what each subprocess test and
each spawned gloo rank cost. multiprocessing's forkserver imports them once, in a server of
its own that never runs a tensor operation (so no thread pool or device state is copied), and
forks every child from it: a child is a clean process, with its own pid, signals, exit status
and memory, that finds those modules already imported.

A child inherits the server's environment, which is the test process's when the server
started: ``run_with_env`` passes the test process's environment at the time of the call.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRELOAD = [
    "torch",
    "torch.distributed",
    "lightning",
    "pipeline.training",
    "pipeline.evaluation",
    "tests.support.fault_runner",
]


def context():
    """The forkserver context; the server starts (and imports ``PRELOAD``) at its first use."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start() -> None:
    """Starts the server now, without waiting for its imports (tests/conftest.py, once the
    tests are collected: the imports then overlap with the first tests)."""
    from multiprocessing import forkserver

    context()
    forkserver.ensure_running()


def run_with_env(env: dict, fn, *args):
    """In a child: the test process's environment at the start, then ``fn(*args)``."""
    os.environ.clear()
    os.environ.update(env)
    return fn(*args)


def fork_launches(monkeypatch, module) -> None:
    """For one test: the processes that a benchmark ``module`` starts (each measurement in a
    process of its own, for its own peak memory or its own process group) are forked from the
    server instead of spawned. The benchmark's code is otherwise what it runs."""
    import types

    import torch.multiprocessing as torch_mp

    def spawn(fn, args=(), nprocs=1, join=True, **kwargs):  # torch.multiprocessing.spawn's
        context()
        return torch_mp.start_processes(fn, args, nprocs, join, start_method="forkserver")

    if getattr(module.mp, "spawn", None) is torch_mp.spawn:  # torch.multiprocessing
        monkeypatch.setattr(module.mp, "spawn", spawn)
    else:  # multiprocessing: get_context("spawn")
        monkeypatch.setattr(module, "mp", types.SimpleNamespace(get_context=lambda _: context()))


def _script(script: str, argv: list[str], out: str, err: str) -> None:
    import runpy

    os.chdir(ROOT)
    sys.stdout, sys.stderr = open(out, "w", buffering=1), open(err, "w", buffering=1)  # noqa: SIM115
    os.dup2(sys.stdout.fileno(), 1)
    os.dup2(sys.stderr.fileno(), 2)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def run_script(script: str, argv: list[str], timeout: float = 300) -> tuple[int, str, str]:
    """``python script argv...`` from the repository root, as a user types it, in a forked
    child that runs the file as ``__main__``: (exit status, stdout, stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = f"{tmp}/stdout", f"{tmp}/stderr"
        child = context().Process(
            target=run_with_env, args=(dict(os.environ), _script, script, argv, out, err)
        )
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise TimeoutError(f"{script} still running after {timeout} s")
        return child.exitcode, Path(out).read_text(), Path(err).read_text()

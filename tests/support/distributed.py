"""Process groups for tests: start P CPU processes on gloo, run a function in each, and let
any assertion in any rank fail the test with its traceback.

Gloo ranks are forked from tests/support/forkserver.py's server (torch and Lightning imported
once), not spawned as fresh interpreters that import them again: seconds per rank, most of
what a 2- or 4-process test cost on two cores. NCCL ranks are still spawned (each process
makes its own CUDA context). A forked rank imports the module defining its function:
tests/support/context_parallel_cases.py costs it little, a test module all that it imports.

Ranks are processes, not threads of the test process: the code under test keeps per-process
state (the default group, each group's layout, the exchanges in flight, the forward's
agreement scope) and the tests patch module functions in one rank only (a rank that runs out
of memory), which threads would share."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.support import forkserver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, timeout=None, backend="gloo",
           env=None, init=True) -> None:  # fmt: skip
    if env is not None:  # a forked rank: the test process's environment, not the server's
        os.environ.clear()
        os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if not init:  # what torchrun gives each process; the code under test makes the group
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world))  # fmt: skip
        return fn(rank, world, *args)
    limit = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    if backend == "nccl":  # one GPU per rank
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, **limit)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, timeout: float | None = None, backend: str = "gloo",
          init: bool = True) -> None:  # fmt: skip
    """Runs ``fn(rank, world, *args)`` in ``world`` processes joined by a gloo group (the
    default group; ``backend="nccl"``: rank i on GPU i); raises if any of them raised.
    ``fn`` must be importable (module level). ``init=False``: no group is made; each process
    finds the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...), for
    code that makes its own group as it would under torchrun.
    A port taken between choosing and binding it is retried with another. ``timeout``
    (seconds): a collective waiting longer raises (gloo's own timeout), and processes still
    running after it (plus a margin) are terminated and TimeoutError raised, so that a test
    of code that could hang fails instead."""
    for attempt in range(3):
        try:
            ctx = _start(fn, world, args, timeout, backend, init)
            if timeout is None:
                while not ctx.join():
                    pass
            else:
                _join_with_deadline(ctx, fn, world, timeout)
            return
        except mp.ProcessRaisedException as err:
            if "address already in use" not in str(err).lower() or attempt == 2:
                raise


def _start(fn, world: int, args, timeout: float | None, backend: str, init: bool):
    if backend == "nccl":
        method, env = "spawn", None
    else:
        method, env = "forkserver", dict(os.environ)
        forkserver.context()  # the server's preloaded modules
    settings = (world, free_port(), fn, args, timeout, backend, env, init)
    return mp.start_processes(_entry, args=settings, nprocs=world, join=False,
                              start_method=method)  # fmt: skip


def _join_with_deadline(ctx, fn, world: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout + 30
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.terminate()
            raise TimeoutError(f"{fn.__name__} on {world} processes still running after "
                               f"{timeout + 30:.0f} s: a rank is waiting alone")  # fmt: skip

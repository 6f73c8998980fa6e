"""Process groups for tests: spawn P CPU processes on gloo, run a function in each, and let
any assertion in any rank fail the test with its traceback."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, timeout=None, backend="gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    limit = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    if backend == "nccl":  # one GPU per rank
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, **limit)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, timeout: float | None = None, backend: str = "gloo") -> None:
    """Runs ``fn(rank, world, *args)`` in ``world`` processes joined by a gloo group (the
    default group; ``backend="nccl"``: rank i on GPU i); raises if any of them raised.
    ``fn`` must be importable (module level).
    A port taken between choosing and binding it is retried with another. ``timeout``
    (seconds): a collective waiting longer raises (gloo's own timeout), and processes still
    running after it (plus a margin) are terminated and TimeoutError raised, so that a test
    of code that could hang fails instead."""
    for attempt in range(3):
        try:
            if timeout is None:
                mp.spawn(_entry, args=(world, free_port(), fn, args, None, backend), nprocs=world,
                         join=True)  # fmt: skip
            else:
                _spawn_with_deadline(fn, world, args, timeout, backend)
            return
        except mp.ProcessRaisedException as err:
            if "address already in use" not in str(err).lower() or attempt == 2:
                raise


def _spawn_with_deadline(fn, world: int, args, timeout: float, backend: str) -> None:
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, timeout, backend),
                             nprocs=world, join=False)  # fmt: skip
    deadline = time.monotonic() + timeout + 30
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.terminate()
            raise TimeoutError(f"{fn.__name__} on {world} processes still running after "
                               f"{timeout + 30:.0f} s: a rank is waiting alone")  # fmt: skip

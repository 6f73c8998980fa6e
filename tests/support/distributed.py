"""Process groups for tests: spawn P CPU processes on gloo, run a function in each, and let
any assertion in any rank fail the test with its traceback."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Runs ``fn(rank, world, *args)`` in ``world`` processes joined by a gloo group (the
    default group); raises if any of them raised. ``fn`` must be importable (module level).
    A port taken between choosing and binding it is retried with another."""
    for attempt in range(3):
        try:
            mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
            return
        except mp.ProcessRaisedException as err:
            if "address already in use" not in str(err).lower() or attempt == 2:
                raise

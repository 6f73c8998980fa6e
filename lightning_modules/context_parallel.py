"""Context parallelism for training (paper 3.1): P consecutive ranks split each window into P
equal slices, in rank order: consecutive ones (``contiguous``) or each a piece from the front
and one from the back (``balanced``); the dilated attention of ``models/`` exchanges what each
slice needs with the others of its group."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch
import torch.distributed as dist

from models.attention import distributed


def check_context_parallel(P) -> int:
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise ValueError(f"context_parallel must be an integer >= 1, got {P!r}")
    return P


def make_context_group(P: int, world: int, rank: int, layout: str = "contiguous"):
    """The process group of ``rank``'s P consecutive ranks (None for P = 1), holding each
    window in ``layout`` (``distributed.LAYOUTS``). Every rank makes all the groups, in the
    same order: ``new_group`` is a collective over the whole world."""
    distributed.check_layout(layout)
    if P == 1:
        return None
    if world % P:
        raise ValueError(
            f"context_parallel={P} must divide the number of processes "
            f"(trainer.devices x num_nodes = {world})"
        )
    groups = [dist.new_group(list(range(g * P, (g + 1) * P))) for g in range(world // P)]
    distributed.set_layout(groups[rank // P], layout)
    return groups[rank // P]


def local_slice(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of ``x (B, N, ...)``, a window its group shares (all of it without
    a group), in the group's layout: inputs and labels alike, so each token keeps its target
    (the loss is a sum over tokens: their order does not matter) and the model reads the
    tokens' global positions from the same layout."""
    if group is None:
        return x
    return distributed.take_slice(x, group)


def slice_seed(base: int, step: int, batch_idx: int, rank: int) -> int:
    """A seed for one slice of one window: a hash of the run's seed, the optimizer step, the
    batch within it (gradient accumulation) and the global rank (which names both the slice
    and the data-parallel group), so that no two slices, windows or steps share dropout
    masks, and a resumed run draws the same ones (no state beyond the step)."""
    key = repr((base, step, batch_idx, rank)).encode()
    return int(hashlib.sha256(key).hexdigest()[:15], 16)


@contextmanager
def slice_rng(step: int, batch_idx: int, active: bool = True):
    """Inside: torch's RNG (CPU and the current CUDA device) seeded by :func:`slice_seed`;
    after: the RNG as before. The ranks of a context-parallel group are seeded alike, so
    without this every slice of a window would draw the same dropout mask (the mask of
    position i repeating at i + l, i + 2l, ...). With it, the masks of a window are the
    concatenation of P independent draws: a context-parallel run with dropout is then a
    single-process run with a differently drawn (equally distributed) mask, equal to it in
    distribution, not bit for bit. Non-reentrant checkpointing saves and restores the RNG
    state it finds, so a recomputation in the backward draws the same masks."""
    if not active:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.manual_seed(slice_seed(torch.initial_seed(), step, batch_idx, rank))
        yield

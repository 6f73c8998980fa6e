"""Context parallelism for training (paper 3.1): P consecutive ranks split each window into P
equal consecutive slices, in rank order; the dilated attention of ``models/`` exchanges what
each slice needs with the others of its group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def check_context_parallel(P) -> int:
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise ValueError(f"context_parallel must be an integer >= 1, got {P!r}")
    return P


def make_context_group(P: int, world: int, rank: int):
    """The process group of ``rank``'s P consecutive ranks (None for P = 1). Every rank makes
    all the groups, in the same order: ``new_group`` is a collective over the whole world."""
    if P == 1:
        return None
    if world % P:
        raise ValueError(
            f"context_parallel={P} must divide the number of processes "
            f"(trainer.devices x num_nodes = {world})"
        )
    groups = [dist.new_group(list(range(g * P, (g + 1) * P))) for g in range(world // P)]
    return groups[rank // P]


def local_slice(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of ``x (B, N, ...)``, a window its group shares (all of it without
    a group)."""
    if group is None:
        return x
    n = x.shape[1] // dist.get_world_size(group)
    j = dist.get_rank(group)
    return x[:, j * n : (j + 1) * n]

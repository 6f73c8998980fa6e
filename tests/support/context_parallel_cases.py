"""What each rank runs in the context-parallel tests: the distributed result on its slice
against the single-process result on the whole sequence (forward 1e-5, gradients 1e-4), one
optimizer step, train.py's and eval.py's work. Every rank's function lives here, not in the
test modules, so that a forked rank imports none of them."""

from __future__ import annotations

import functools
import zlib

import torch
import torch.distributed as dist

from models.attention import distributed
from models.attention.dilated import dilated_attention

FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def slice_of(x: torch.Tensor, rank: int, world: int, layout: str = "contiguous") -> torch.Tensor:
    """Rank ``rank``'s tokens of a whole window ``x (B, N, ...)``, in its slice's order."""
    from models.attention.distributed import token_index

    return x[:, token_index(world, rank, x.shape[1] // world, layout)]


def compare_case(rank, world, case, layout="contiguous") -> None:
    name, (B, N, H, D, segs, rates, causal) = case
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # the same on every rank
    q, k, v, grad = (torch.randn(B, N, H, D, generator=gen) for _ in range(4))
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = dilated_attention(*full, segs, rates, causal=causal)
    (ref * grad).sum().backward()
    part = functools.partial(slice_of, rank=rank, world=world, layout=layout)
    mine = [part(x).clone().requires_grad_() for x in (q, k, v)]
    with distributed.using_layout(dist.group.WORLD, layout):
        out = dilated_attention(*mine, segs, rates, causal=causal, group=dist.group.WORLD)
    (out * part(grad)).sum().backward()
    where = f"{name} {layout} (rank {rank} of {world})"
    torch.testing.assert_close(out, part(ref), atol=FWD_TOL, rtol=0,
                               msg=lambda m: f"{where} output: {m}")  # fmt: skip
    for label, leaf, whole in zip("qkv", mine, full, strict=True):
        torch.testing.assert_close(leaf.grad, part(whole.grad), atol=GRAD_TOL, rtol=0,
                                   msg=lambda m, n=label: f"{where} grad {n}: {m}")  # fmt: skip


def compare_cases(rank, world, cases, layouts=("contiguous",)) -> None:
    for layout in layouts:
        for case in cases:
            compare_case(rank, world, case, layout)


def expect_errors(rank, world, cases) -> None:
    """Every rank raises the same ValueError (nobody waits on a collective)."""
    import re

    for name, (*shapes, segs, rates, message) in cases:
        q = torch.randn(*shapes[rank])
        try:
            dilated_attention(q, q, q, segs, rates, group=dist.group.WORLD)
        except ValueError as err:
            assert re.search(message, str(err)), f"{name}: {err}"
        else:
            raise AssertionError(f"{name}: rank {rank} did not raise")
    dist.barrier()  # every rank got here: nobody hung


def compare_models(rank, world) -> None:
    """:func:`compare_model` for each position and layout, then :func:`host_reads_per_layer`:
    one process group for all of them."""
    for layout in ("contiguous", "balanced"):
        for position in ("xpos", "rope"):
            with distributed.using_layout(dist.group.WORLD, layout):
                compare_model(rank, world, position, layout)
    host_reads_per_layer(rank, world)


def compare_model(rank, world, position, layout="contiguous") -> None:
    """A LongNet on a sequence split across ranks: logits equal the single-process slice, and
    parameter gradients summed over ranks equal the single-process ones (XPOS/RoPE at global
    positions, anchors shared across ranks; balanced layout: two pieces per rank)."""
    from models.transformer import ModelConfig, TransformerLM

    sizes = dict(vocab_size=50, d_model=32, n_layer=2, n_head=4, d_ff=64)
    cfg = ModelConfig(**sizes, segment_lengths=[8, 32, 64], dilation_rates=[1, 2, 4],
                      position=position)  # fmt: skip
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    tokens = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    full.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    mine = model(slice_of(tokens, rank, world, layout), group=dist.group.WORLD)
    (mine.square().sum() / full.numel()).backward()
    torch.testing.assert_close(mine, slice_of(full, rank, world, layout), atol=FWD_TOL, rtol=0)
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)
        where = f"{position} {layout} grad {name}"
        torch.testing.assert_close(p.grad, want[name], atol=GRAD_TOL, rtol=1e-4,
                                   msg=lambda m, n=where: f"{n}: {m}")  # fmt: skip


def host_reads_per_layer(rank, world) -> None:
    """A LongNet forward and backward split across ranks, inside the one agreement of its
    forward: the host reads (``aten._local_scalar_dense``, which ``.item()``, ``bool()`` and
    ``int()`` of a tensor dispatch to, and ``.tolist()``) and all_gathers do not grow with the
    number of layers; and there are none at all inside the layers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from models.attention import distributed
    from models.transformer import ModelConfig, TransformerLM

    counts = {"host": 0, "all_gather": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                counts["host"] += 1
            return func(*args, **(kwargs or {}))

    tolist, all_gather = torch.Tensor.tolist, dist.all_gather

    def counted_tolist(self):
        counts["host"] += 1
        return tolist(self)

    def counted_all_gather(*args, **kwargs):
        counts["all_gather"] += 1
        return all_gather(*args, **kwargs)

    def run(n_layer: int, checkpointing: str) -> dict:
        cfg = ModelConfig(vocab_size=50, d_model=32, n_layer=n_layer, n_head=4, d_ff=64,
                          segment_lengths=[8, 32, 64], dilation_rates=[1, 2, 4],
                          checkpointing=checkpointing)  # fmt: skip
        model = TransformerLM(cfg)
        tokens = slice_of(torch.randint(0, 50, (1, 64), generator=torch.Generator()), rank, world)
        model(tokens, group=dist.group.WORLD).sum().backward()  # warm caches (coverage check)
        torch.Tensor.tolist, dist.all_gather = counted_tolist, counted_all_gather
        counts.update(host=0, all_gather=0)
        try:
            with Count(), distributed.agreed_forward(dist.group.WORLD, tokens, 0):
                agreement = dict(counts)  # the agreement itself, once per forward
                model(tokens, group=dist.group.WORLD).sum().backward()
        finally:
            torch.Tensor.tolist, dist.all_gather = tolist, all_gather
        return agreement, dict(counts)

    for checkpointing in ("none", "layer"):
        for n_layer in (1, 2):
            agreement, total = run(n_layer, checkpointing)
            assert agreement["all_gather"] == 1 and agreement["host"] >= 1, agreement
            assert total == agreement, (checkpointing, n_layer, agreement, total)


def _one_step(module, batch, group, world, checkpointing) -> dict:
    """One optimizer step of ``module`` (a CausalLM) on ``batch`` as Lightning's DDP runs it:
    this rank's loss backpropagated, gradients averaged over the ranks, AdamW's first step.
    Returns the averaged gradients."""
    from lightning_modules.optim import adamw_with_schedule

    module.config.checkpointing = checkpointing  # the model's and every block's config
    module.context_group = group
    opt = adamw_with_schedule(module.parameters(), module.optim, 10)["optimizer"]
    module.train()
    loss = module.training_step(batch, 0)
    loss.backward()
    module.on_after_backward()
    if group is not None:
        for p in module.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world  # DDP averages gradients over all ranks
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    opt.step()
    return grads


def training_step_equivalences(rank, world) -> None:
    """:func:`training_step_equivalence` with each checkpointing mode, the balanced layout
    (with and without recomputation), the mutation; then :func:`dropout_masks_differ_by_slice`:
    one process group for all."""
    for checkpointing in ("none", "layer", "sublayer"):
        training_step_equivalence(rank, world, checkpointing, False)
    for checkpointing in ("none", "layer"):
        training_step_equivalence(rank, world, checkpointing, False, "balanced")
    training_step_equivalence(rank, world, "none", True)
    dropout_masks_differ_by_slice(rank, world)


def training_step_equivalence(rank, world, checkpointing, mutate, layout="contiguous") -> None:
    """CausalLM with each window split across the ranks (context_parallel = world) against one
    process with the whole window, float64, dropout 0: after one optimizer step every
    gradient and every parameter agree within 1e-6 relative. Windows with unscored targets,
    one with a slice holding none (a recall-like batch). ``mutate``: the P factor of each
    slice's loss dropped; then the gradients must differ (the check returns the worst relative
    difference for the caller to judge)."""
    import warnings

    from data.batch import IGNORE_INDEX
    from lightning_modules.lm import CausalLM

    warnings.filterwarnings("ignore", message=".*self.log.*")
    model = dict(vocab_size=50, d_model=32, n_layer=2, n_head=4, d_ff=64,
                 segment_lengths=[8, 32], dilation_rates=[1, 2], dropout=0.0)  # fmt: skip
    optim = dict(warmup_steps=0, lr=1e-3)
    torch.manual_seed(0)
    ref = CausalLM(model, optim).double()
    split = CausalLM(model, optim, context_parallel=world, context_parallel_layout=layout)
    split = split.double()
    split.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50, (2, 65), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[0, ::3] = IGNORE_INDEX
    labels[1, 32:] = IGNORE_INDEX  # window 1: the second slice scores nothing
    batch = {"input_ids": tokens[:, :-1], "labels": labels}
    if mutate:
        split.context_parallel = 1  # each slice's loss no longer scaled by P
    want = _one_step(ref, batch, None, 1, checkpointing)
    with distributed.using_layout(dist.group.WORLD, layout):  # as make_context_group sets it
        got = _one_step(split, batch, dist.group.WORLD, world, checkpointing)
    worst = max(((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)
    if mutate:
        assert worst > 0.1, f"dropping the P factor went unnoticed: {worst}"
        return
    assert worst < 1e-6, (checkpointing, layout, worst)
    for (name, p), q in zip(split.named_parameters(), ref.parameters(), strict=True):
        where = f"{checkpointing} {layout} {name}"
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9,
                                   msg=lambda m, n=where: f"{n}: {m}")  # fmt: skip


def dropout_masks_differ_by_slice(rank, world) -> None:
    """With dropout, the slices of one window draw different masks (the embedding dropout's,
    seen by a hook), the same ones again for the same step and batch, others at the next
    step."""
    from lightning_modules.lm import CausalLM

    model = dict(vocab_size=50, d_model=32, n_layer=1, n_head=4, d_ff=64,
                 segment_lengths=[8, 32], dilation_rates=[1, 2], dropout=0.5)  # fmt: skip
    torch.manual_seed(0)  # every rank seeded alike, as seed_everything does
    module = CausalLM(model, context_parallel=world)
    module.context_group = dist.group.WORLD
    module.train()
    masks = []
    module.model.drop.register_forward_hook(lambda m, i, o: masks.append(o[0] == 0))
    tokens = torch.zeros(1, 64, dtype=torch.int64)  # every slice the same tokens
    batch = {"input_ids": tokens, "labels": tokens}
    for batch_idx in (0, 0, 1):
        module._scored(batch, batch_idx)
        module.on_after_backward()
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    every = [torch.empty_like(masks[0]) for _ in range(world)]
    dist.all_gather(every, masks[0])
    assert not torch.equal(every[0], every[1]), "the slices of a window share a dropout mask"


def local_pairs_run_while_rows_travel(rank, world) -> None:
    """The exchanges are launched and not waited on: when the attention starts, messages are
    in flight, the calls on this rank's own keys run first, and the one wait comes only
    before the first call that reads received rows (or at the end, on a rank that only
    sends)."""
    from models.attention import mixing

    events = []
    forward, wait = mixing.attention_forward, mixing.wait_in_flight

    def kernel(*args, **kwargs):
        events.append("kernel")
        return forward(*args, **kwargs)

    def waiting():
        if mixing.IN_FLIGHT:
            events.append("wait")
        wait()

    mixing.attention_forward, mixing.wait_in_flight = kernel, waiting
    try:
        q = torch.randn(1, 32, 4, 8)
        dilated_attention(q, q, q, [8, 64], [1, 2], group=dist.group.WORLD)
    finally:
        mixing.attention_forward, mixing.wait_in_flight = forward, wait
    first = events.index("wait")  # (rank 0 only sends: it waits for its sends at the end)
    assert first > 0 and events.count("wait") == 1, events
    if rank == 1:  # it reads rank 0's rows after the wait
        assert "kernel" in events[first:], events
    reverse_launched_before_local_backward(rank)


def reverse_launched_before_local_backward(rank) -> None:
    """The backward: the received rows' gradients are sent back (launched, not waited) as soon
    as they are complete, before the calls on this rank's own keys of the spanning pair; the
    exchange's own backward then only waits. Rank 1 computes its received rows' gradients
    first; rank 0 (which received nothing) launches its receive at once."""
    from models.attention import distributed, mixing

    events = []
    backward, launch = mixing.attention_backward, distributed._Reverse.launch

    def kernel(*args, **kwargs):
        events.append("kernel")
        return backward(*args, **kwargs)

    def launching(self, dk, dv):
        events.append(f"launch {dk.shape[0]}")
        return launch(self, dk, dv)

    mixing.attention_backward, distributed._Reverse.launch = kernel, launching
    try:
        q = torch.randn(1, 32, 4, 8, requires_grad=True)
        dilated_attention(q, q, q, [8, 64], [1, 2], group=dist.group.WORLD).sum().backward()
    finally:
        mixing.attention_backward, distributed._Reverse.launch = backward, launch
    launches = [i for i, e in enumerate(events) if e.startswith("launch")]
    assert len(launches) == 1 and "kernel" in events[launches[0] :], events
    assert events[launches[0]] == f"launch {rank}", events  # rank 1 received one piece


def attention_checks(rank, world, cases, errors=None, models=False) -> None:
    """One process group: :func:`compare_cases` in both layouts, then (given ``errors``)
    :func:`expect_errors` and :func:`local_pairs_run_while_rows_travel`, then (``models``)
    :func:`compare_models`."""
    compare_cases(rank, world, cases, ("contiguous", "balanced"))
    if errors is not None:
        expect_errors(rank, world, errors)
        local_pairs_run_while_rows_travel(rank, world)
    if models:
        compare_models(rank, world)


def train_rank(rank, world, args) -> None:
    """One process of ``torchrun train.py``: train.py's function, whose Lightning DDP makes
    the group (and the context-parallel one) from torchrun's variables."""
    from pipeline.training import train

    train(args)


def eval_with_oom(rank, world, ckpt, runs):
    """eval.py's work on 2 ranks, once per ``(layout, failing rank, out_dir)`` of ``runs``, in
    one group: the later runs also show the group still aligned after the earlier ones. The
    failing rank runs out of memory in the feed-forward of the first layer at length 16
    (slices of 8: one piece of 8, or two of 4 in the balanced layout), after that layer's
    exchange and before the second's: the other rank is then already on its way into the next
    exchange, and the failing one must issue the exchanges of its layout that it owes."""
    import models.transformer as T
    from pipeline.evaluation import evaluate

    original = T.FeedForward.forward
    failing = {"rank": None}

    def forward(self, x):
        if rank == failing["rank"] and x.shape[1] == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, x)

    T.FeedForward.forward = forward
    for layout, failing_rank, out_dir in runs:
        failing["rank"] = failing_rank
        args = [f"checkpoints=[{ckpt}]", "context_lengths=[16,64]", "split=val", "suffix=8",
                f"out_dir={out_dir}", "context_parallel=2", "span_windows=0",
                f"context_parallel_layout={layout}"]  # fmt: skip
        (result,) = evaluate(args)
        at, where = result.lengths, f"{layout}, rank {failing_rank} failing"
        assert at[16].ppl is None and at[16].reason == "not reached: out of memory", (where, at)
        assert at[64].ppl is not None and at[64].tokens > 0, (where, at[64])  # went on, aligned
        assert (
            result.prompting[64] == result.prompting[64]
            and result.prompting[16] != (result.prompting[16])
        ), where  # NaN where the prompt of 16 ran out of memory on one rank

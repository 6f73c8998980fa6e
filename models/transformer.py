"""A decoder-only language model whose attention is chosen by name: LongNet and its baselines.

LongNet (Ding et al., 2023) is this backbone with ``attention="dilated"``, ``norm="subln"`` and
``position="xpos"``: MAGNETO's Sub-LN (Wang et al., 2022, "Foundation Transformers": one more
LayerNorm before the attention output projection and before the second FFN layer, and weights
of v, out, fc1, fc2 scaled at init by ``gamma = sqrt(log(2 * n_layer))``) with XPOS relative
positions. The baselines keep everything and swap the attention: ``"dense"`` (causal SDPA),
``"sparse"`` (the Sparse Transformer's fixed pattern) and ``"sliding"`` (a causal window).

``forward(tokens (B, N)) -> logits (B, N, vocab)``; the loss is computed outside. Positions are
computed for the length seen, so a model trained at one length runs at any other.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import distributed
from models.attention.backends import flash_unsupported
from models.attention.dilated import (
    check_coverage,
    dilated_attention,
    unattended_offsets,
    validate_schedule,
)
from models.attention.documents import Documents
from models.attention.sliding import (
    block_causal_attention,
    blockwise_attention,
    check_window,
    sliding_window_attention,
)
from models.attention.sparse import (
    check_pattern,
    dilated_keys_per_query,
    sparse_attention,
    sparse_keys_per_query,
)
from models.positional import apply_rope, apply_xpos, dilated_anchor

AttentionKind = Literal["dense", "dilated", "sparse", "sliding"]
PositionKind = Literal["xpos", "rope", "none"]
NormKind = Literal["subln", "pre"]
InitKind = Literal["auto", "magneto", "gpt2", "torch"]
CheckpointingKind = Literal["none", "layer", "sublayer"]
ATTENTIONS, POSITIONS, NORMS, INITS = (
    get_args(t) for t in (AttentionKind, PositionKind, NormKind, InitKind)
)
log = logging.getLogger(__name__)
_SAID: set = set()  # (schedule, n_head) whose unattended offsets were logged
CHECKPOINTING = get_args(CheckpointingKind)


def _list(*values):
    return field(default_factory=lambda: list(values))


@dataclass
class ModelConfig:
    """Every setting of a TransformerLM; the defaults are the tiny LongNet that trains on 2 CPU
    cores (4 x 256 x 4, the paper's schedule / 16). The comment beside each field is its
    documentation (configs/default.yaml is generated from it)."""

    vocab_size: int | None = None  # null: set by the run from its tokenizer
    d_model: int = 256  # width
    n_layer: int = 4  # blocks
    n_head: int = 4  # attention heads
    d_ff: int = 1024  # feed-forward width
    dropout: float = 0.0  # on embeddings and residual branches
    attention: AttentionKind = "dilated"  # dilated is LongNet; dense, sparse, sliding the baselines
    segment_lengths: list[int] = _list(128, 256, 512, 1024, 2048)  # dilated: w, one per pair
    dilation_rates: list[int] = _list(1, 2, 4, 6, 12)  # dilated: r, one per pair
    stretch_last: bool = False  # dilated: last pair spans the whole sequence, same keys per query
    window: int = 512  # sliding: keys per query
    blockwise: int | None = None  # dense only: blockwise causal attention with this block
    sparse_block: int = 128  # sparse: block length
    sparse_summary: int = 8  # sparse: summary positions at the end of every block
    position: PositionKind = "xpos"  # relative positions on q and k
    xpos_scale_base: float = 512.0  # XPOS decay length (gamma)
    rope_base: float = 10000.0  # RoPE (and XPOS rotation) frequency base
    norm: NormKind = "subln"  # subln: MAGNETO; pre: pre-LN
    tie_embeddings: bool = True  # output layer shares the input embedding
    init: InitKind = "auto"  # auto: magneto for subln, gpt2 for pre; torch: PyTorch's own
    embed_std: float | None = None  # re-draw the input embedding from normal(this); null: keep
    checkpointing: CheckpointingKind = "none"  # layer | sublayer: recomputed in the backward
    recompute_chunk: int = 8192  # sublayer: tokens per recomputed piece of the feed-forward

    def __post_init__(self):
        self.segment_lengths = list(self.segment_lengths)
        self.dilation_rates = list(self.dilation_rates)
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_ff", "recompute_chunk"):
            value = getattr(self, name)
            if name == "vocab_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        choices = (("attention", ATTENTIONS), ("position", POSITIONS), ("norm", NORMS),
                   ("checkpointing", CHECKPOINTING), ("init", INITS))  # fmt: skip
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.position != "none" and (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"position={self.position!r} needs an even head dimension, got "
                f"d_model / n_head = {self.d_model // self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.embed_std is not None and not (
            isinstance(self.embed_std, (int, float)) and not isinstance(self.embed_std, bool)
            and math.isfinite(self.embed_std) and self.embed_std > 0
        ):  # fmt: skip
            raise ValueError(f"embed_std must be a positive number or null, got {self.embed_std!r}")
        if self.xpos_scale_base <= 0 or self.rope_base <= 0:
            raise ValueError("xpos_scale_base and rope_base must be positive")
        if self.attention == "dilated":
            check_coverage(
                validate_schedule(self.segment_lengths, self.dilation_rates), self.n_head
            )
        elif self.attention == "sliding":
            check_window(self.window)
        if self.blockwise is not None:
            if self.attention != "dense":
                raise ValueError(f"blockwise applies to attention='dense', not {self.attention!r}")
            check_window(self.blockwise)
        elif self.attention == "sparse":
            check_pattern(self.sparse_block, self.sparse_summary)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Builds from a plain dict (a loaded YAML); an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model keys {unknown}; accepted: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# layers


@dataclass(frozen=True)
class Slice:
    """Where a forward's tokens sit: global ``positions (N,)`` in a sequence of ``total``,
    and the process group holding the other slices (None: the tokens are the whole sequence).
    With ``documents`` packed in the rows, ``positions`` and ``total`` are ``(B, N)``: each
    token's position inside its document and that document's length."""

    positions: torch.Tensor
    total: int | torch.Tensor
    group: object = None
    documents: Documents | None = None

    @classmethod
    def of(cls, tokens: torch.Tensor, group=None, documents: Documents | None = None) -> Slice:
        n = tokens.shape[1]
        if documents is not None:
            return cls(documents.positions(), documents.token_lengths(), None, documents)
        if group is None or dist.get_world_size(group) == 1:
            return cls(torch.arange(n, device=tokens.device), n)
        # global positions of this rank's tokens, under the group's layout (distributed.py)
        where = distributed.positions(group, n, tokens.device)
        return cls(where, dist.get_world_size(group) * n, group)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.n_head, self.head_dim = cfg, cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        # MAGNETO's Sub-LN: normalise the attention output before its projection
        self.inner_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "subln" else nn.Identity()
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        # XPOS needs an anchor block that every attended (query, key) pair shares
        dilated = cfg.attention == "dilated" and not cfg.stretch_last  # stretched: the sequence
        self.anchor = dilated_anchor(cfg.segment_lengths) if dilated else None

    def forward(self, x: torch.Tensor, where: Slice) -> torch.Tensor:
        """``x (B, N, C) -> (B, N, C)``."""
        q, k, v = self.project(x, where.positions, where.total)
        return self.output(self.attend(q, k, v, where.group, where.documents))

    def project(self, x: torch.Tensor, positions: torch.Tensor, total):
        """``x (B, n, C)`` at ``positions (n,)`` of a sequence of ``total`` (or ``(B, n)``
        each, inside documents: ``Slice``) -> q, k, v ``(B, n, H, Dh)``, positions applied;
        token-wise."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_head, self.head_dim).unbind(2)  # (B,N,H,Dh)
        if self.cfg.position == "xpos":
            q, k = apply_xpos(q, k, positions, self.cfg.xpos_scale_base, self.anchor, total)
        elif self.cfg.position == "rope":
            q, k = apply_rope(q, k, positions, self.cfg.rope_base)
        if self.cfg.position != "none":  # q, k are new tensors: v alone keeps qkv's buffer
            v = v.contiguous()  # (alive until the backward, under recomputation) otherwise
        return q, k, v

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """``y (B, n, H, Dh) -> (B, n, C)``: Sub-LN and the output projection; token-wise."""
        return self.out_proj(self.inner_norm(y.flatten(2)))

    def attend(self, q, k, v, group=None, documents: Documents | None = None):
        """(B, N, H, Dh) x3 -> (B, N, H, Dh), causal; with ``group``, N is this rank's slice;
        with ``documents``, each document's tokens attend inside it (``documents.py``)."""
        cfg, docs = self.cfg, documents
        if cfg.attention == "dilated":
            if cfg.stretch_last and group is not None:
                raise ValueError("model.stretch_last is not supported with context parallelism")
            segments, rates = schedule_at(cfg, q.shape[1])
            return dilated_attention(q, k, v, segments, rates, group=group, documents=docs)
        if cfg.attention == "sparse":
            return sparse_attention(q, k, v, cfg.sparse_block, cfg.sparse_summary, documents=docs)
        if cfg.attention == "sliding":
            return sliding_window_attention(q, k, v, cfg.window, documents=docs)
        if cfg.blockwise is not None:
            return blockwise_attention(q, k, v, cfg.blockwise, documents=docs)
        if docs is not None:
            return block_causal_attention(q, k, v, docs)
        if q.is_cuda and flash_unsupported(q) is None:
            from flash_attn import flash_attn_func  # pads head_dim itself

            return flash_attn_func(q, k, v, causal=True)
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        return y.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.inner_norm = nn.LayerNorm(cfg.d_ff) if cfg.norm == "subln" else nn.Identity()
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.inner_norm(F.gelu(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.ffn = nn.LayerNorm(cfg.d_model), FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, where: Slice, recompute: bool = False) -> torch.Tensor:
        """``recompute``: each residual branch (attention, feed-forward) is run again in the
        backward, one at a time; the feed-forward, whose activations are the largest (d_ff
        wide), in pieces of ``recompute_chunk`` tokens (``tokenwise``). With dropout, the
        feed-forward branch is recomputed whole around its pieces, so that its mask is drawn
        once for the whole sequence, as without recomputation (the same masks, the same
        gradients; it costs one more forward of the feed-forward)."""
        if not recompute:
            x = x + self._attention(x, where)
            return x + self._feed_forward(x)
        chunk = self.attn.cfg.recompute_chunk
        x = x + checkpoint(self._attention, x, where, use_reentrant=False)
        if self.drop.p > 0 and self.training:
            return x + checkpoint(self._feed_forward, x, chunk, use_reentrant=False)
        return x + self._feed_forward(x, chunk)  # only the pieces' inputs are kept

    def _attention(self, x: torch.Tensor, where: Slice) -> torch.Tensor:
        return self.drop(self.attn(self.norm1(x), where))

    def _feed_forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        if chunk is None:
            return self.drop(self.ffn(self.norm2(x)))
        return self.drop(tokenwise(lambda xc: self.ffn(self.norm2(xc)), chunk, x))


def tokenwise(fn, chunk: int, x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to pieces of ``chunk`` tokens of ``x (B, N, ...)``, each piece
    checkpointed: the forward keeps only the pieces' inputs (views of ``x``) and the backward
    recomputes one piece at a time, so ``fn``'s intermediate activations exist for ``chunk``
    tokens, never for N. ``fn`` must be token-wise (each output token depends on its input
    token only) and draw no random numbers: the result and its gradients then equal
    ``fn(x)``'s. Returns the pieces' outputs concatenated along the tokens."""
    pieces = x.split(chunk, dim=1)  # (B, <=chunk, ...) views
    return torch.cat([checkpoint(fn, xc, use_reentrant=False) for xc in pieces], dim=1)


class TransformerLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (null means: set by the run)")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()
        pairs = tuple(zip(config.segment_lengths, config.dilation_rates, strict=True))
        if config.attention == "dilated" and (pairs, config.n_head) not in _SAID:
            _SAID.add((pairs, config.n_head))  # once per schedule and head count per process
            for gap in unattended_offsets(pairs, config.n_head):
                log.warning(
                    "dilated schedule: %s; a query reaches those keys only through other pairs "
                    "or layers (n_head >= r attends them all)",
                    gap,
                )

    def reset_parameters(self) -> None:
        """``init``: ``magneto`` (what ``auto`` means for subln): Xavier-normal weights, those
        of v, out_proj, fc1, fc2 times gamma = sqrt(log(2L)), embeddings normal(d^-1/2).
        ``gpt2`` (``auto`` for pre-LN): normal(0.02), residual projections / sqrt(2L).
        ``torch``: PyTorch's defaults (embeddings normal(1), weights and biases uniform in
        +-1/sqrt(fan_in); a tied embedding takes the output layer's, reset last). At width 128
        these are 2-4x gpt2's 0.02, and on the recall task (data.source=recall) they let the
        two-layer copying circuit form within a few hundred steps where gpt2's and magneto's
        did not in 600 (experiments/README.md, section 6).

        ``embed_std`` then re-draws the input embedding alone (and so a tied output layer) from
        normal(embed_std). MAGNETO's embeddings, normal(d^-1/2) (0.088 at width 128), are what
        kept its copying circuit from forming in the calibration runs; the paper's init with
        ``embed_std=1`` formed it as fast as PyTorch's (experiments/README.md, section 7)."""
        self._init_weights()
        if self.config.embed_std is not None:
            nn.init.normal_(self.embed.weight, std=float(self.config.embed_std))

    def _init_weights(self) -> None:
        cfg = self.config
        init = cfg.init if cfg.init != "auto" else ("magneto" if cfg.norm == "subln" else "gpt2")
        if init == "torch":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                    module.reset_parameters()
            return
        magneto = init == "magneto"
        nn.init.normal_(self.embed.weight, std=cfg.d_model**-0.5 if magneto else 0.02)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.d_model**-0.5 if magneto else 0.02)
        gamma = math.sqrt(math.log(2 * cfg.n_layer))
        for block in self.blocks:
            for lin in (block.attn.qkv, block.attn.out_proj, block.ffn.fc1, block.ffn.fc2):
                if magneto:
                    nn.init.xavier_normal_(lin.weight)
                else:
                    nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            with torch.no_grad():
                if magneto:
                    block.attn.qkv.weight[2 * cfg.d_model :].mul_(gamma)  # v rows
                    for lin in (block.attn.out_proj, block.ffn.fc1, block.ffn.fc2):
                        lin.weight.mul_(gamma)
                else:
                    for lin in (block.attn.out_proj, block.ffn.fc2):
                        lin.weight.mul_(1 / math.sqrt(2 * cfg.n_layer))

    def forward(self, tokens: torch.Tensor, group=None, documents=None) -> torch.Tensor:
        """``tokens (B, N) -> logits (B, N, vocab)``. With ``group`` (a process group of P
        ranks), ``tokens`` is this rank's slice of a sequence of P * N tokens split in rank
        order (context parallelism, dilated attention only): positions are global and the
        attention exchanges keys and values with the other ranks. With ``documents``
        (``cu_seqlens (n_docs + 1,)`` over the B*N tokens, or a ``Documents``), each document
        packed in the rows gets exactly the logits it gets alone (docs/design.md)."""
        return self.lm_head(self.hidden(tokens, group, documents))

    def where(self, tokens: torch.Tensor, group=None, documents=None) -> Slice:
        """Checks ``tokens (B, N)`` and says where they sit in the whole sequence."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens must be (B, N) int64, got {tuple(tokens.shape)} {tokens.dtype}"
            )
        docs = self._documents(tokens, group, documents)
        where = Slice.of(tokens, group, docs)
        if where.group is not None and self.config.attention != "dilated":
            raise ValueError(
                "a sequence split across ranks needs attention='dilated', got "
                f"{self.config.attention!r}"
            )
        return where

    def _documents(self, tokens, group, documents) -> Documents | None:
        """The checked documents, or None for none or one per row (the unmasked forward)."""
        if documents is None:
            return None
        if group is not None and dist.get_world_size(group) > 1:
            raise ValueError("documents with a sequence split across ranks are not built")
        if self.config.attention == "dilated" and self.config.stretch_last:
            raise ValueError(
                "documents with model.stretch_last are not built: each document would need its "
                "own stretched schedule; use stretch_last=false"
            )
        docs = Documents.of(documents, *tokens.shape, tokens.device)
        return None if docs.whole_rows else docs

    def hidden(self, tokens: torch.Tensor, group=None, documents=None) -> torch.Tensor:
        """The final normalised hidden states ``(B, N, d_model)``: what the output layer reads
        (a chunked loss, ``models/loss.py``, takes them with ``lm_head.weight``). With
        ``checkpointing="layer"`` only block inputs are kept and each block's forward runs again
        in the backward; with ``"sublayer"`` the input of each residual branch is kept and one
        branch at a time is recomputed (less memory, the same extra compute). The same dropout
        masks either way (non-reentrant checkpoint, RNG state restored). ``documents``: as in
        :meth:`forward`."""
        where = self.where(tokens, group, documents)
        x = self.drop(self.embed(tokens))
        mode = self.config.checkpointing if torch.is_grad_enabled() else "none"
        for block in self.blocks:
            if mode == "layer":
                x = checkpoint(block, x, where, use_reentrant=False)
            else:
                x = block(x, where, recompute=mode == "sublayer")
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# size and cost


def n_params(config: ModelConfig, embeddings: bool = True) -> int:
    """Parameter count, built on the meta device (no memory); shared weights counted once."""
    with torch.device("meta"):
        model = TransformerLM(config)
    total = sum(p.numel() for p in model.parameters())
    return total if embeddings else total - model.embed.weight.numel()


def schedule_at(config: ModelConfig, n: int) -> tuple[list[int], list[int]]:
    """The dilated schedule run on ``n`` tokens: the configured one or, with ``stretch_last``
    and ``n`` beyond the last segment, that pair widened to the whole sequence (w = n) with its
    rate scaled to keep the keys each kept query attends (r = ceil(r_last * n / w_last)): the
    paper's rule of a fixed w / r per pair, applied to a segment that grows with the input.
    Its rate then passes n_head, so the pair attends n_head of its r offsets (a warning says
    which at build time only for the configured pairs)."""
    w, r = list(config.segment_lengths), list(config.dilation_rates)
    if config.stretch_last and n > w[-1]:
        r[-1] = -(-r[-1] * n // w[-1])
        w[-1] = n
    return w, r


def attended_keys(config: ModelConfig, seq_len: int) -> float:
    """Average number of keys a query attends per head (causal), for the attention type."""
    if config.attention == "dense":
        return (seq_len + 1) / 2
    if config.attention == "sliding":
        w = min(config.window, seq_len)
        return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
    if config.attention == "sparse":
        return sparse_keys_per_query(config.sparse_block, config.sparse_summary, seq_len)
    return dilated_keys_per_query(*schedule_at(config, seq_len), seq_len, config.n_head)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6 per weight used in a matmul (the output
    layer included), and 12 * d_model per attended key per layer (q.k and p.v, times 3)."""
    # every weight is used in a matmul once per token, except an untied input embedding
    untied = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    dense = 6 * (n_params(config) - untied)
    attn = 12 * config.n_layer * config.d_model * attended_keys(config, seq_len)
    return dense + attn

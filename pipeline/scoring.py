"""Perplexity as context grows: the measurements behind eval.py, in plain PyTorch.

Window policy (stated in every output): documents of the chosen split that have at least
``max(context_lengths) + 1`` tokens serve every length, so the numbers are comparable. At length
L each document is cut into disjoint windows of L + 1 tokens that stay inside it (L inputs, L
targets) and every target of every window is scored; perplexity is
``exp(sum of NLL / number of scored tokens)`` with the sum in float64.

With ``max_tokens_per_document`` set, only the first that many (+1) tokens of each document are
used, the same span at every L.

Prompting curve (the paper's Figure 7b): for each such document, the same final ``suffix``
tokens of its first ``max(L) + 1`` tokens are scored given a prompt of growing length P, i.e.
the last ``suffix`` targets of the window of P inputs that ends there.

Position profile: mean NLL by position bucket (powers of two) inside the longest windows.

A length a model cannot run (out of memory, XPOS out of range) is reported as not reached
with its reason; any other error is a bug and propagates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.config import DataConfig
from data.corpus import Split, prepare
from data.token_bytes import byte_table
from models.attention import distributed
from models.loss import chunked_nll
from models.positional import XposRangeError
from models.transformer import ModelConfig, TransformerLM, schedule_at
from pipeline import windows
from settings.loading import ConfigError
from settings.schema import CORPUS_KEYS

POLICY = (
    "disjoint in-document windows of L+1 tokens (L scored) from documents of at least "
    "max(L)+1 tokens, the same documents at every L"
)
LN2 = math.log(2)


def policy(window: str, stride: int | None = None) -> str:
    """The window method in words, stated in every output (pipeline/windows.py)."""
    how = {
        "disjoint": "disjoint in-document windows of L+1 tokens (L scored)",
        "strided": f"strided windows of L+1 tokens every {stride} tokens, each scoring only the "
        "tokens the previous did not (YaRN's sliding window)",
        "truncate": "the first L+1 tokens of each document, once (YaRN's --truncate)",
        "rolling": "lm-eval's rolling windows: every token after a start token, disjoint "
        "windows of L+1, the last ending at the document's end",
    }[window]
    return f"window={window}: {how}; documents of at least max(L)+1 tokens, the same at every L"


@dataclass
class Model:
    """One checkpoint, ready to score tokens."""

    name: str
    net: TransformerLM
    train_len: int
    data: DataConfig  # the corpus to evaluate on, tokenized with this model's tokenizer
    label: str = ""
    own_corpus: bool = True  # data names the corpus the model was trained on
    group: object = None  # the ranks that split each window (context_parallel), or None
    loss_chunk: int = 8192  # tokens per chunk of the output layer
    hf: bool = False  # a Hugging Face causal LM (pipeline/hf_models.py), not a checkpoint
    prefix: int | None = None  # the start token of rolling windows (EOD; hf: BOS, else EOS)
    byte_table: np.ndarray | None = None  # (V,) bytes per token id (data/token_bytes.py)


@dataclass
class AtLength:
    """Perplexity at one context length, or why it was not reached."""

    length: int
    ppl: float | None = None
    tokens: int = 0
    windows: int = 0
    reason: str | None = None  # set when not reached
    nll: float = 0.0  # summed in float64 over the scored tokens, nats
    bytes: int = 0  # UTF-8 bytes of the text the scored tokens cover

    @property
    def bpb(self) -> float | None:
        """Bits per byte: NLL / bytes * log2(e)."""
        return None if self.ppl is None or not self.bytes else self.nll / self.bytes / LN2


@dataclass
class Result:
    """What eval.py measured of one checkpoint: a language model's perplexity by length and
    probes, or a task's (``data.source=recall``) answer accuracy by length and distance."""

    label: str
    documents: list[str] = field(default_factory=list)  # names of the scored documents
    lengths: dict[int, AtLength] = field(default_factory=dict)
    prompting: dict[int, float] = field(default_factory=dict)  # P -> mean NLL (NaN: not run)
    prompting_bpb: dict[int, float] = field(default_factory=dict)  # P -> bits per byte
    positions: list = field(default_factory=list)  # (length, bucket start, end, mean NLL)
    span: list = field(default_factory=list)  # repeated-span probe rows (pipeline/span_probe)
    recall: list[dict] = field(default_factory=list)  # accuracy rows (pipeline/recall_probe)


def not_reached(err: Exception) -> str | None:
    """The reason a length cannot be run on this machine, or None (a bug: let it raise)."""
    if isinstance(err, RankFailed):  # a context-parallel forward failed on some rank(s)
        return err.reached
    if isinstance(err, XposRangeError):
        return str(err).splitlines()[0][:160]
    cpu_oom = isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    if isinstance(err, torch.OutOfMemoryError) or cpu_oom:  # CPU: a RuntimeError that says so
        return "out of memory"
    return None


def load_model(path: str, data_overrides: dict, blockwise: bool, device) -> Model:
    """Rebuilds a checkpoint's model and the data config to evaluate it on (its own corpus
    unless ``data_overrides`` name another, always its own tokenizer)."""
    # imported here: checkpoints.py imports Lightning (seconds), which the rest of scoring
    # (window methods, bits per byte, hf: baselines) and its tests do not need
    from pipeline.checkpoints import check_checkpoint

    ckpt = check_checkpoint(path)
    run = ckpt["hyper_parameters"].get("run_config") or {}
    model_cfg = dict(ckpt["hyper_parameters"]["model"])
    train_len = int(run.get("data", {}).get("seq_len", 0)) or None
    if blockwise and model_cfg["attention"] == "dense" and train_len:
        model_cfg["blockwise"] = train_len
    net = TransformerLM(ModelConfig.from_dict(model_cfg))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    net.load_state_dict(state)
    net.to(device).eval()
    tokenizer = Path(path).resolve().parent.parent / "tokenizer.json"
    own = run.get("data", {})
    given = {k: v for k, v in data_overrides.items() if v is not None}
    data = {**own, **given}
    own_corpus = all(data.get(k) == own.get(k) for k in CORPUS_KEYS)
    if tokenizer.exists():
        data["tokenizer_path"] = str(tokenizer)
    try:
        data_cfg = DataConfig.from_dict(data)
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err
    name = Path(path).resolve().parent.parent.name
    cfg = net.config
    schedule = {
        "dilated": f"w={cfg.segment_lengths} r={cfg.dilation_rates}",
        "sparse": f"block={cfg.sparse_block} summary={cfg.sparse_summary}",
        "sliding": f"window={cfg.window}",
        "dense": f"blockwise={cfg.blockwise}" if cfg.blockwise else "full",
    }[cfg.attention]
    label = f"{name} [{cfg.attention} {schedule}, trained at {train_len}]"
    return Model(name, net, train_len or 0, data_cfg, label, own_corpus)


def long_documents(split: Split, need: int) -> list[int]:
    return [d for d, n in enumerate(split.lengths) if n >= need]


def check_lengths(split: Split, lengths: list[int], split_name: str, least: int = 0) -> list[int]:
    """The documents that serve every length (and have at least ``least`` tokens), or a
    clear error."""
    if len(split.lengths) == 0:
        raise ConfigError(f"the {split_name} split of the corpus is empty")
    docs = long_documents(split, max(max(lengths) + 1, least))
    if not docs:
        raise ConfigError(
            f"context length {max(lengths)} (min_document_tokens={least}) is longer than every "
            f"document of the {split_name} split: its longest has {int(split.lengths.max())} "
            f"tokens ({len(split.lengths)} documents)"
        )
    return docs


@torch.no_grad()
def nll(net: TransformerLM, windows: torch.Tensor, group=None, chunk: int = 8192):
    """(W, L+1) token windows -> (W, L) per-target NLL, float64. With ``group`` (P ranks, the
    same windows on each), each rank runs its slice of every window and the slices' NLL are
    gathered, so every rank returns the whole (W, L); a failure on any rank raises
    :class:`RankFailed` on every rank (:func:`split_nll`)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if group is None or dist.get_world_size(group) == 1:
        hidden = net.hidden(inputs)  # no N x V logits
        out = chunked_nll(hidden.flatten(0, 1), net.lm_head.weight, targets.flatten(), chunk)
        return out.view(windows.shape[0], -1).double()
    return split_nll(net, inputs, targets, group, chunk)


class RankFailed(RuntimeError):
    """A forward that failed on some rank of a context-parallel group, raised on every rank:
    ``reasons`` by rank (None where the rank succeeded), ``reached`` the reason if every
    failure is one :func:`not_reached` accepts (out of memory, XPOS range), else None."""

    def __init__(self, reasons: list[str | None], reached: str | None):
        failed = {rank: why for rank, why in enumerate(reasons) if why is not None}
        super().__init__(f"forward failed on rank(s) of the context-parallel group: {failed}")
        self.reasons, self.reached = reasons, reached


def split_nll(net: TransformerLM, inputs, targets, group, chunk: int) -> torch.Tensor:
    """:func:`nll` of this rank's slice, taken so that no rank is ever left alone in a
    collective. Ranks fail alone (memory differs by rank: a causal segment's later ranks
    receive more keys; XPOS's range depends on the global position), and a rank that stops
    mid-forward leaves the others waiting in the next layer's exchange. So: the ranks agree on
    the forward once (``distributed.enter_forward``); a rank that fails first issues the
    exchanges it still owes, with zeros (``distributed.drain``); then one all_reduce of a flag
    tells every rank whether any failed, and if so every rank raises :class:`RankFailed`,
    which eval.py reports as it would the failure itself (length not reached, or a bug).

    The rank's tokens are those of the group's layout (``distributed.take_slice``, inputs and
    targets alike, as ``CausalLM`` takes them; the model reads their global positions from the
    same layout), and the gathered NLL are put back in sequence order."""
    world = dist.get_world_size(group)
    n = inputs.shape[1] // world
    inputs, targets = distributed.take_slice(inputs, group), distributed.take_slice(targets, group)
    param = net.lm_head.weight
    fp = distributed.fingerprint(net.config, param.dtype, torch.is_grad_enabled())
    failure, bug = None, None  # (reason, whether not_reached accepts it); the error if not
    with distributed.agreed_forward(group, inputs, fp) as scope:
        try:
            hidden = net.hidden(inputs, group=group)
            out = chunked_nll(hidden.flatten(0, 1), param, targets.flatten(), chunk)
            out = out.view(inputs.shape[0], -1).double()
        except Exception as err:  # noqa: BLE001 - every rank must learn of it; raised below
            reason = not_reached(err)
            failure = (reason or f"{type(err).__name__}: {str(err)[:300]}", reason is not None)
            bug = None if reason else err  # an out-of-memory's traceback holds its tensors
        if failure is not None:  # outside the except: the failed forward's tensors are freed
            _drain(net, scope, inputs.shape[0], distributed.rank_slice(group, n), group)
    if distributed.any_rank(failure is not None, group, param.device):
        every = [None] * world
        dist.all_gather_object(every, failure, group=group)
        reasons = [None if f is None else f[0] for f in every]
        known = all(f is None or f[1] for f in every)
        reached = "; ".join(sorted({r for r in reasons if r})) if known else None
        raise RankFailed(reasons, reached) from bug
    parts = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(parts, out.contiguous(), group=group)
    return in_sequence_order(torch.cat(parts, dim=1), group)


def in_sequence_order(gathered: torch.Tensor, group) -> torch.Tensor:
    """``(W, N)``: the ranks' slices concatenated in rank order, each in its slice's order,
    put back in sequence order under the group's layout (contiguous: as it is)."""
    layout = distributed.layout_of(group)
    if layout == "contiguous":
        return gathered
    world, n = dist.get_world_size(group), gathered.shape[1] // dist.get_world_size(group)
    index = torch.cat([distributed.token_index(world, p, n, layout) for p in range(world)])
    out = torch.empty_like(gathered)
    out[:, index.to(gathered.device)] = gathered
    return out


def _drain(net: TransformerLM, scope, batch: int, at, group) -> None:
    """The exchanges of a whole forward of ``net`` that this rank has not issued yet, with
    zeros: every layer runs the same schedule on the same shapes, so a forward's exchanges
    are one layer's, ``n_layer`` times; ``at`` (``distributed.rank_slice``) carries the
    group's layout, which decides the exchanges."""
    cfg, param = net.config, net.lm_head.weight
    pairs = list(zip(*schedule_at(cfg, at.total), strict=True))
    layer = distributed.exchange_plan(pairs, at, batch, cfg.n_head, cfg.d_model // cfg.n_head,
                                      causal=True)  # fmt: skip
    distributed.drain(scope, layer * cfg.n_layer, group, param.dtype, param.device)


def windows_at(split: Split, docs: list[int], length: int, cap: int | None = None) -> np.ndarray:
    """Start offsets (flat) of the disjoint in-document windows of ``length + 1`` tokens, within
    the first ``cap + 1`` tokens of each document (``None``: all of it)."""
    starts = []
    for d in docs:
        base, n = int(split.starts[d]), int(split.lengths[d])
        n = n if cap is None else min(n, cap + 1)
        starts += [base + off for off in range(0, n - length, length)]
    return np.asarray(starts, dtype=np.int64)


def planned_tokens(split: Split, docs, length: int, cap=None, window="disjoint", stride=None):
    """Target positions :func:`measure` runs at ``length`` (scored or not): a progress total."""
    total = 0
    for d in docs:
        n = int(split.lengths[d]) if cap is None else min(int(split.lengths[d]), cap + 1)
        n += window == "rolling"  # the start token in front
        total += sum(e - b - 1 for b, e, _ in windows.plan(n, length, window, stride))
    return total


def gather(split: Split, starts, length: int, device) -> torch.Tensor:
    rows = [split.tokens[s : s + length + 1].astype(np.int64) for s in starts]
    return torch.from_numpy(np.stack(rows)).to(device)


@dataclass
class Measured:
    """Sums over every scored token at one context length."""

    nll: float = 0.0  # nats, float64
    tokens: int = 0
    bytes: int = 0
    windows: int = 0
    sums: torch.Tensor | None = None  # (L,) NLL by target position in full windows
    counts: torch.Tensor | None = None  # (L,) scored targets by position


def model_nll(model: Model, windows: torch.Tensor) -> torch.Tensor:
    """(W, S) token windows -> (W, S-1) per-target NLL, float64, whatever the model."""
    if model.hf:
        from pipeline.hf_models import hf_nll

        return hf_nll(model.net, windows)
    return nll(model.net, windows, model.group, model.loss_chunk)


def document(model: Model, split: Split, d: int, cap=None, start: bool = False):
    """(ids (n,), bytes (n,)) of document ``d`` (its first ``cap + 1`` tokens), int64; with
    ``start`` the model's start token (0 bytes) in front."""
    s, n = int(split.starts[d]), int(split.lengths[d])
    n = n if cap is None else min(n, cap + 1)
    ids = np.asarray(split.tokens[s : s + n], dtype=np.int64)
    nb = split.bytes[s : s + n] if hasattr(split, "bytes") else model.byte_table[ids]
    if start:
        ids, nb = np.concatenate([[model.prefix], ids]), np.concatenate([[0], nb])
    return ids, np.asarray(nb, dtype=np.int64)


def measure(model, split, docs, length, batch_tokens, device, cap=None, bar=None,
            window: str = "disjoint", stride: int | None = None) -> Measured:  # fmt: skip
    """NLL, tokens and bytes of every token ``window`` scores at context ``length``
    (pipeline/windows.py), windows of one size batched up to ``batch_tokens``."""
    out = Measured(sums=torch.zeros(length, dtype=torch.float64))
    out.counts = torch.zeros(length, dtype=torch.float64)
    pending: dict[int, list] = {}  # window size -> [(ids, bytes of targets, first scored)]
    for d in docs:
        ids, nb = document(model, split, d, cap, start=window == "rolling")
        for b, e, f in windows.plan(len(ids), length, window, stride):
            rows = pending.setdefault(e - b, [])
            rows.append((ids[b:e], nb[b + 1 : e], f - b - 1))
            if len(rows) * (e - b - 1) >= batch_tokens:
                _run(model, pending.pop(e - b), out, length, device, bar)
    for rows in pending.values():
        _run(model, rows, out, length, device, bar)
    return out


def _run(model, rows, out: Measured, length: int, device, bar) -> None:
    """Adds one batch of equal-size windows to ``out``."""
    batch = torch.from_numpy(np.stack([r[0] for r in rows])).to(device)  # (W, S)
    short = batch.shape[1] - 1
    if model.group is not None and short < length:
        # split windows must be the context length (the ranks' slices, the layout's pieces):
        # a shorter one (strided's last, a short document) is padded at its end, which a
        # causal model's earlier positions never see, and the padding's NLL dropped
        batch = F.pad(batch, (0, length - short))  # (W, L + 1), any token: never seen
    values = model_nll(model, batch).cpu()[:, :short]  # (W, S-1)
    skip = torch.tensor([r[2] for r in rows])[:, None]
    keep = (torch.arange(values.shape[1])[None, :] >= skip).double()  # (W, S-1) scored
    nbytes = torch.from_numpy(np.stack([r[1] for r in rows]))
    out.nll += (values * keep).sum().item()
    out.tokens += int(keep.sum().item())
    out.bytes += int((nbytes * keep).sum().item())
    out.windows += len(rows)
    if values.shape[1] == length:  # the position profile: full windows only
        out.sums += (values * keep).sum(0)
        out.counts += keep.sum(0)
    if bar is not None:
        bar.update(values.numel())


def perplexity(
    model, split: Split, docs, length: int, batch_tokens: int, device, cap=None, bar=None
):
    """(ppl, scored tokens, windows, mean NLL by position) at context length ``length``,
    disjoint windows (:func:`measure` gives every method, and bytes)."""
    m = measure(model, split, docs, length, batch_tokens, device, cap, bar)
    return math.exp(m.nll / m.tokens), m.tokens, m.windows, m.sums / m.counts.clamp(min=1)


def prompting(model: Model, split: Split, docs, prompts: list[int], suffix: int, device, bar=None):
    """(P -> mean NLL, P -> bits per byte) of the same final ``suffix`` targets given P inputs
    (NaN where the model cannot run at P, e.g. XPOS out of range for a dense model)."""
    out, bpb = {}, {}
    for p in prompts:
        try:
            total, count, nbytes = 0.0, 0, 0
            for s in prompt_starts(split, docs, p, max(prompts)):
                values = model_nll(model, gather(split, [s], p, device))[:, -suffix:].cpu()
                total, count = total + values.sum().item(), count + values.numel()
                nbytes += int(_flat_bytes(model, split, s + p + 1 - suffix, s + p + 1).sum())
            out[p], bpb[p] = total / count, total / max(nbytes, 1) / LN2
        except (ValueError, RuntimeError) as err:
            if not_reached(err) is None:
                raise
            out[p] = bpb[p] = float("nan")
        if bar is not None:
            bar.update(len(docs))
    return out, bpb


def _flat_bytes(model: Model, split: Split, a: int, b: int) -> np.ndarray:
    """Bytes of flat tokens a .. b-1 of ``split``."""
    if hasattr(split, "bytes"):
        return np.asarray(split.bytes[a:b])
    return model.byte_table[np.asarray(split.tokens[a:b], dtype=np.int64)]


def prompt_starts(split: Split, docs, prompt: int, end: int) -> list[int]:
    """Window starts for prompt length ``prompt`` whose last target is token ``end`` of each
    document: the scored suffix is the same tokens whatever the prompt length."""
    return [int(split.starts[d]) + end - prompt for d in docs]


def position_buckets(mean_nll: torch.Tensor) -> list[tuple[int, int, float]]:
    """Mean NLL over positions [2^k - 1, 2^(k+1) - 1) of the window (the first bucket is 0)."""
    out, lo = [], 0
    while lo < len(mean_nll):
        hi = min(len(mean_nll), 2 * lo + 1)
        out.append((lo, hi, mean_nll[lo:hi].nanmean().item()))
        lo = hi
    return out


def corpus_split(model: Model, split_name: str) -> Split:
    """The split of the model's corpus, tokenized with its tokenizer; sets the model's byte
    table and start token from that tokenizer."""
    if model.hf:
        from pipeline.hf_models import hf_split

        return hf_split(model, split_name)
    try:
        corpus = prepare(model.data)
        model.byte_table, model.prefix = byte_table(corpus.tokenizer), corpus.eod
        return corpus.split(split_name)
    except ValueError as err:
        raise ConfigError(f"data for {model.name}: {err}") from err


def load_checked(path: str, data_overrides, blockwise, device) -> Model:
    """:func:`load_model`; a checkpoint whose weights or config do not fit this code is a
    ConfigError naming it."""
    try:
        return load_model(path, data_overrides, blockwise, device)
    except ConfigError:
        raise
    except (ValueError, KeyError, RuntimeError) as err:  # from_dict, load_state_dict
        raise ConfigError(f"checkpoint {path!r} cannot be loaded: {err}") from err

"""Every setting of a training run and of an evaluation: typed dataclasses, the only schema.

A run is a :class:`RunConfig`: ``model`` (``models.transformer.ModelConfig``), ``data``
(``data.config.DataConfig``), ``optim`` (``lightning_modules.optim.OptimConfig``),
``checkpoint``, ``trainer`` (``lightning.Trainer``'s own arguments, passed as they are) and the
run keys below. An evaluation is an :class:`EvalConfig`. Each class keeps its checks in
``__post_init__``; the comment beside each field is its documentation, and
``configs/default.yaml`` / ``configs/eval.yaml`` are generated from these classes
(``python -m settings.generate``), so that the defaults live here alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Literal, Optional, get_type_hints

from data.config import DataConfig
from lightning_modules.optim import OptimConfig  # Lightning-free: a config loads without it
from models.loss import check_chunk
from models.transformer import ModelConfig

# trainer defaults, and what each means (the trainer section is a free dict: any argument of
# lightning.Trainer may be added, and is checked against its signature)
TRAINER_DEFAULTS = {
    "max_steps": (1000, "optimizer steps"),
    "accelerator": ("auto", "cpu | gpu | auto"),
    "devices": (1, "per node"),
    "strategy": ("auto", "ddp, fsdp, ... (Lightning's)"),
    "precision": (None, "null: 32-true on CPU, bf16-mixed on CUDA"),
    "gradient_clip_val": (2.0, "by global norm"),
    "val_check_interval": (200, "validate every N training steps"),
    "limit_val_batches": (20, "on at most this many batches"),
    "check_val_every_n_epoch": (None, "null: by steps (val_check_interval), not epochs"),
    "log_every_n_steps": (10, "metrics to logs/ and tensorboard/"),
    "accumulate_grad_batches": (1, "batches per optimizer step"),
    "num_sanity_val_steps": (0, "a fresh run validates first anyway (validate_first)"),
    "use_distributed_sampler": (False, "the data module shards by rank itself (exact val sums)"),
}


def _list(*values):
    return field(default_factory=lambda: list(values))


def _trainer_defaults() -> dict[str, Any]:
    return {key: value for key, (value, _) in TRAINER_DEFAULTS.items()}


@dataclass
class CheckpointConfig:
    every_n_steps: int = 500  # keep a checkpoint every N steps, besides last.ckpt

    def __post_init__(self):
        if self.every_n_steps < 1:
            raise ValueError(f"checkpoint.every_n_steps must be >= 1, got {self.every_n_steps}")


@dataclass
class RunConfig:
    """``python train.py [YAML ...] [key=value ...]``: these defaults, then each YAML, then
    each override; an unknown key or a wrong type is an error naming it."""

    run_dir: str = "runs/default"  # every output of the run: checkpoints, logs, config, tokenizer
    seed: int = 1234  # seeds torch, numpy and python (workers too)
    resume: str | None = None  # null: start fresh; auto: run_dir's last checkpoint if any; a path
    init_from: str | None = None  # a checkpoint whose weights start a fresh run (not resumed)
    validate_first: bool = True  # a fresh run measures validation loss before its first step
    context_parallel: int = 1  # ranks that split each window (paper 3.1; dilated attention)
    context_parallel_layout: str = "contiguous"  # or balanced: pieces j, 2P-1-j (even work)
    loss_chunk: int = 8192  # tokens per chunk of the output layer and loss: no tokens x vocab
    model: ModelConfig = field(default_factory=ModelConfig)  # models.transformer.ModelConfig
    data: DataConfig = field(default_factory=DataConfig)  # data.config.DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)  # lightning_modules.optim.OptimConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # when to save
    trainer: dict[str, Any] = field(default_factory=_trainer_defaults)  # lightning.Trainer's own

    def __post_init__(self):
        check_chunk(self.loss_chunk)
        P = self.context_parallel
        if P < 1:
            raise ValueError(f"context_parallel must be >= 1, got {P}")
        if P > 1 and self.model.attention != "dilated":
            raise ValueError(
                f"context_parallel={P} splits windows across ranks for dilated attention only, "
                f"got model.attention={self.model.attention!r}"
            )
        if self.data.seq_len % P:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} must be a multiple of context_parallel={P}"
            )
        layouts = ("contiguous", "balanced")  # models/attention/distributed.py's LAYOUTS
        if self.context_parallel_layout not in layouts:
            layout = self.context_parallel_layout
            raise ValueError(f"context_parallel_layout={layout!r} is not one of {layouts}")
        if self.context_parallel_layout == "balanced" and self.data.seq_len % (2 * P):
            raise ValueError(
                f"data.seq_len={self.data.seq_len} must be a multiple of 2 x "
                f"context_parallel={P} for context_parallel_layout=balanced"
            )
        if P > 1 and self.trainer.get("use_distributed_sampler"):  # each rank its own windows
            raise ValueError(
                f"trainer.use_distributed_sampler=true gives every rank different windows, but "
                f"context_parallel={P} needs the {P} ranks of a group to read the same window; "
                "set it false (the default: the data module shards by group itself)"
            )
        if P > 1 and self.model.stretch_last:
            raise ValueError(
                f"model.stretch_last=true widens the last segment to the sequence, which "
                f"context_parallel={P} does not split; set one of them off"
            )
        self._check_documents()

    def _check_documents(self) -> None:
        """data.document_mask: attention inside documents, on one process per window."""
        if not self.data.document_mask:
            return
        if self.context_parallel > 1:
            raise ValueError(
                f"data.document_mask=true with context_parallel={self.context_parallel} is not "
                "built (documents crossing ranks); use context_parallel=1 or document_mask=false"
            )
        if self.model.attention == "dilated" and self.model.stretch_last:
            raise ValueError(
                "data.document_mask=true with model.stretch_last=true is not built (each "
                "document would need its own stretched schedule); set one of them false"
            )


# eval.py's data section: the corpus settings of DataConfig, each null to keep the checkpoint's
EVAL_DATA_KEYS = (
    "source", "path", "glob", "hf_name", "hf_config", "hf_split", "hf_text_field",
    "cache_dir", "val_fraction", "test_fraction",
)  # fmt: skip
# the keys that name a corpus (the others only say where to cache it or how to split it)
CORPUS_KEYS = EVAL_DATA_KEYS[:7]
_DATA_TYPES = get_type_hints(DataConfig)
EvalData = make_dataclass(
    "EvalData",
    [(name, Optional[_DATA_TYPES[name]], field(default=None)) for name in EVAL_DATA_KEYS],  # noqa: UP045
    namespace={"__doc__": "Overrides of each checkpoint's data config (null: keep it)."},
)
EvalData.__module__ = __name__

EvalSplit = Literal["auto", "train", "val", "test", "all"]
EvalWindow = Literal["disjoint", "strided", "truncate", "rolling"]  # pipeline/windows.py METHODS


@dataclass
class EvalConfig:
    """``python eval.py checkpoints=[...] [YAML ...] [key=value ...]``: perplexity by context
    length of each checkpoint (lightning_modules' scoring is in pipeline/scoring.py)."""

    checkpoints: list[str] = _list()  # e.g. [runs/demo/checkpoints/last.ckpt]
    context_lengths: list[int] = _list(512, 1024, 2048, 4096, 8192)  # tokens of context
    out_dir: str = "runs/eval"  # tables and plots; written only when everything succeeded
    split: EvalSplit = "auto"  # auto: test split of a model's own corpus, all documents of another
    suffix: int = 256  # prompting curve: the final tokens scored at every prompt length
    max_tokens_per_document: int | None = None  # score only this many first tokens of each
    max_documents: int | None = None  # score only the first N documents serving every length
    document_seed: int | None = None  # with max_documents: a seeded random N (null: first N)
    min_document_tokens: int = 0  # score only documents of at least this many tokens
    window: EvalWindow = "disjoint"  # disjoint | strided | truncate | rolling: pipeline/windows.py
    stride: int = 256  # window=strided: tokens between window starts (YaRN's --sliding-window)
    batch_tokens: int = 16384  # tokens per forward pass (windows are batched up to this)
    dense_blockwise: bool = False  # dense models beyond their training length: blockwise
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    context_parallel: int = 1  # processes splitting each window: run with torchrun, P of them
    context_parallel_layout: str = "contiguous"  # or balanced: pieces j, 2P-1-j (even work)
    loss_chunk: int = 8192  # tokens per chunk of the output layer and loss
    span_windows: int = 4  # repeated-span probe: windows at the longest length (0: off)
    span_length: int = 32  # repeated-span probe: tokens in the repeated span
    span_distances: list[int] | None = None  # repeated-span probe: copy distances (null: 2^k)
    recall_sequences: int = 32  # recall checkpoints: held-out sequences per (length, distance)
    distances: list[int] | None = None  # recall: record-to-query distances; null: 16, 32, ...
    recall_by_generation: bool = False  # recall: also answers decoded greedily (same sequences)
    data: EvalData = field(default_factory=EvalData)  # another corpus to score (null: own)

    def __post_init__(self):
        if self.span_windows < 0 or self.span_length < 2:
            raise ValueError(
                f"span_windows must be >= 0 and span_length >= 2, got {self.span_windows}, "
                f"{self.span_length}"
            )
        bad = [d for d in self.span_distances or [] if d < self.span_length]
        if bad:
            raise ValueError(
                f"span_distances must be >= span_length ({self.span_length}: the copy may not "
                f"overlap the span), got {bad}"
            )
        if self.recall_sequences < 1:
            raise ValueError(f"recall_sequences must be at least 1, got {self.recall_sequences}")
        lengths = list(self.context_lengths)
        if not self.checkpoints or not lengths or min(lengths) < 1 or self.suffix < 1:
            raise ValueError(
                "checkpoints and context_lengths must be non-empty, lengths and suffix >= 1; got "
                f"checkpoints={list(self.checkpoints)}, context_lengths={lengths}, "
                f"suffix={self.suffix}"
            )
        cap = self.max_tokens_per_document
        if cap is not None and cap < max(lengths):
            raise ValueError(
                f"max_tokens_per_document={cap} must be at least the longest context "
                f"length {max(lengths)}"
            )
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents must be at least 1 or null, got {self.max_documents}")
        if self.min_document_tokens < 0:
            raise ValueError(f"min_document_tokens must be >= 0, got {self.min_document_tokens}")
        if self.window == "strided" and not 1 <= self.stride <= min(lengths):
            raise ValueError(
                f"stride={self.stride} must be in 1 .. the shortest context length "
                f"{min(lengths)} (a longer stride leaves tokens unscored; stride = L: disjoint)"
            )
        check_chunk(self.loss_chunk)
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {self.batch_tokens}")
        P = self.context_parallel
        if P < 1 or any(n % P for n in lengths):
            raise ValueError(
                f"context_parallel={P} must be >= 1 and divide every context length {lengths}"
            )
        layouts = ("contiguous", "balanced")  # models/attention/distributed.py's LAYOUTS
        layout = self.context_parallel_layout
        if layout not in layouts:
            raise ValueError(f"context_parallel_layout={layout!r} is not one of {layouts}")
        odd = [n for n in lengths if n % (2 * P)]
        if layout == "balanced" and P > 1 and odd:  # (one process: no layout to keep)
            raise ValueError(
                f"context lengths {odd} must be multiples of 2 x context_parallel={P} for "
                "context_parallel_layout=balanced (2P pieces per window)"
            )


@dataclass
class GenerateConfig:
    """``python generate.py checkpoint=PATH prompt="..." [YAML ...] [key=value ...]``: samples
    continuations of a prompt from a checkpoint, with its own tokenizer (exact cached decoding:
    models/decoding.py)."""

    checkpoint: str | None = None  # e.g. runs/demo/checkpoints/last.ckpt (required)
    prompt: str | None = None  # the text to continue (this or prompt_file)
    prompt_file: str | None = None  # a UTF-8 file holding the prompt; -: standard input
    max_new_tokens: int = 200  # tokens generated per sample
    temperature: float = 0.8  # 0: greedy (the most likely token every time)
    top_k: int | None = None  # sample among the k most likely tokens only (null: all)
    top_p: float = 1.0  # nucleus: the fewest likeliest tokens holding this mass (1: all)
    seed: int = 1234  # seeds the sampling: the same seed, the same samples
    num_samples: int = 1  # continuations of the prompt, decoded together as one batch
    stop_at_eos: bool = True  # a sample ends at the end-of-document token
    prefill_chunk: int | None = None  # prompt tokens per prefill chunk (null: all at once)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    stream: bool = True  # print the first sample as its tokens arrive (the others at the end)
    out: str | None = None  # JSON of the samples, tokens/s and provenance (null: not written)

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError(f"checkpoint=PATH is required, got {self.checkpoint!r}")
        if (self.prompt is None) == (self.prompt_file is None):
            raise ValueError(
                "give exactly one of prompt=TEXT and prompt_file=PATH (- for stdin), got "
                f"prompt={self.prompt!r}, prompt_file={self.prompt_file!r}"
            )
        if self.prompt is not None and not self.prompt:
            raise ValueError("prompt must not be empty, got ''")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("top_k", "prefill_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or null, got {value}")
        for name in ("max_new_tokens", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

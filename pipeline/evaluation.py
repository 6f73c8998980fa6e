"""eval.py's work, callable in-process: for each checkpoint, perplexity by context length, the
prompting curve and the position profile (a language model), or answer accuracy by distance (a
recall task), one Result each. Method: pipeline/scoring.py; files: pipeline/eval_files.py,
written into out_dir all at once at the end (a failed run leaves an existing out_dir
untouched)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.config import DataConfig
from models.attention import distributed
from pipeline import recall_generation, recall_probe, span_probe
from pipeline import scoring as sc
from pipeline.eval_files import write_outputs, write_recall
from pipeline.hf_models import is_hf, load_hf
from pipeline.progress import Progress
from settings.loading import ConfigError, load_eval_config, split_argv
from settings.schema import CORPUS_KEYS, EvalConfig

log = logging.getLogger("eval")


def split_for(model: sc.Model, split: str) -> str:
    """``auto``: the test split of the model's own corpus; every document of another corpus
    (the model saw none of them, and a hash split of a small corpus may leave no test one)."""
    if split != "auto":
        return split
    return "test" if model.own_corpus else "all"


def evaluate(argv: list[str] | EvalConfig) -> list[sc.Result]:
    """One Result per checkpoint, in order, whichever measurement its data asks for (a
    language model's perplexity, a recall task's accuracy); the files go to out_dir."""
    cfg = argv if isinstance(argv, EvalConfig) else load_eval_config(*split_argv(argv))
    made_group = cfg.context_parallel > 1 and not dist.is_initialized()
    try:
        return _evaluate(cfg)
    finally:
        if made_group and dist.is_initialized():
            # no process leaves while another still talks to it (gloo aborts at exit then)
            dist.barrier()
            dist.destroy_process_group()


def _evaluate(cfg: EvalConfig) -> list[sc.Result]:
    lengths = sorted(int(n) for n in cfg.context_lengths)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    group, device = context_group(cfg.context_parallel, device, cfg.context_parallel_layout)
    models = _load_models(cfg, group, device)
    first = group is None or dist.get_rank(group) == 0  # the one that reports and writes
    if first:
        for model in models:
            if not model.hf:
                recall_probe.say_reach(model.name, model.net.config, lengths[-1])
    if _recall_only(models, group, cfg):
        return evaluate_recall(models, lengths, cfg, device)
    if cfg.recall_by_generation:  # before any work: a language model has no answers to decode
        raise ConfigError(
            "recall_by_generation=true scores recall checkpoints (data.source=recall) only; "
            f"got language models {[m.name for m in models]} (set it false, the default)"
        )
    names = _split_names(models, cfg.split)
    splits = [sc.corpus_split(m, s) for m, s in zip(models, names, strict=True)]
    docs = [sc.check_lengths(s, lengths, n, cfg.min_document_tokens)
            for s, n in zip(splits, names, strict=True)]  # fmt: skip
    docs = select_documents(models, splits, docs, names, cfg)  # all checks before any work
    results = _score_all(models, splits, docs, names, lengths, cfg, device, first)
    if first:
        write_outputs(results, lengths, cfg, names, Path(cfg.out_dir))
    return results


def _split_names(models: list[sc.Model], split: str) -> list[str]:
    """Each model's split; a Hugging Face model reads the split of the first checkpoint."""
    own = [split_for(m, split) for m in models if not m.hf]
    other = own[0] if own else ("all" if split == "auto" else split)
    return [other if m.hf else split_for(m, split) for m in models]


def select_documents(models, splits, docs, names, cfg: EvalConfig) -> list[list[int]]:
    """The documents each model scores. Models reading one corpus and split score the same
    documents (by name: those that serve every length for all of them), so that their bits
    per byte compare; ``max_documents`` keeps the first N, or with ``document_seed`` a seeded
    random sample of N."""
    keys = {
        (tuple(getattr(m.data, k) for k in CORPUS_KEYS), n)
        for m, n in zip(models, names, strict=True)
    }
    if len(models) > 1 and len(keys) == 1:
        common = set.intersection(
            *({s.names[d] for d in dd} for s, dd in zip(splits, docs, strict=True))
        )
        if not common:
            raise ConfigError(
                f"no document of the {names[0]} split serves every length for every model "
                f"({[m.name for m in models]})"
            )
        docs = [[d for d in dd if s.names[d] in common] for s, dd in zip(splits, docs, strict=True)]
    if cfg.max_documents is None:
        return docs
    out = []
    for s, dd in zip(splits, docs, strict=True):
        order = sorted(dd, key=lambda d: s.names[d])  # the same order for every tokenization
        if cfg.document_seed is not None:
            pick = np.random.default_rng(cfg.document_seed).permutation(len(order))
            order = [order[i] for i in pick]
        out.append(sorted(order[: cfg.max_documents]))
    return out


def _load_models(cfg: EvalConfig, group, device) -> list[sc.Model]:
    """Every checkpoint (and ``hf:`` model), checked against cfg.data, set to score in
    ``group`` (context parallel: dilated attention only) with cfg.loss_chunk."""
    overrides = {k: getattr(cfg.data, k) for k in cfg.data.__dataclass_fields__}
    models = [sc.load_checked(p, overrides, cfg.dense_blockwise, device)
              for p in cfg.checkpoints if not is_hf(p)]  # fmt: skip
    if any(is_hf(p) for p in cfg.checkpoints):
        models = _with_hf(cfg, models, overrides, device)
    for model in models:
        if group is not None and (model.hf or model.net.config.attention != "dilated"):
            raise ConfigError(
                f"context_parallel={cfg.context_parallel} splits windows for dilated attention "
                f"only; {model.name} has attention={model.net.config.attention!r}"
            )
        model.group, model.loss_chunk = group, cfg.loss_chunk
    return models


def _with_hf(cfg: EvalConfig, models, overrides, device) -> list[sc.Model]:
    """``models`` with the ``hf:`` entries of cfg.checkpoints loaded in their places; they
    read ``data`` (null keys: the first checkpoint's)."""
    base = models[0].data.to_dict() if models else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    if not models and not given.get("source"):
        raise ConfigError("hf: models alone need a corpus: give data.source (and data.path)")
    data = DataConfig.from_dict({**base, **given})
    loaded, out = iter(models), []
    for p in cfg.checkpoints:
        out.append(load_hf(p, data, device) if is_hf(p) else next(loaded))
    return out


def _recall_only(models: list[sc.Model], group, cfg: EvalConfig) -> bool:
    """Whether the checkpoints are recall tasks; raises if recall and language models are
    mixed, or recall ones are split across processes."""
    recall = [not m.hf and m.data.source == "recall" for m in models]
    if any(recall) and (not all(recall) or group is not None):
        raise ConfigError(
            "recall checkpoints are scored by answer accuracy, one process, on their own: "
            f"got {[m.name for m, r in zip(models, recall, strict=True) if not r]} "
            f"(language models) with them, context_parallel={cfg.context_parallel}"
        )
    return any(recall)


def _score_all(models, splits, docs, names, lengths, cfg: EvalConfig, device, first: bool):
    """One Result per model: its documents ``docs`` of split ``splits`` (named ``names``)."""
    prompts = [p for p in lengths if p >= cfg.suffix]
    results = []
    for model, split, dd, name in zip(models, splits, docs, names, strict=True):
        scored = [split.names[d] for d in dd]
        if first:
            log.info("%s: scoring %d documents of the %s split: %s", model.name, len(dd), name,
                     ", ".join(scored[:5]) + (", ..." if len(scored) > 5 else ""))  # fmt: skip
        results.append(
            score_model(model, split, dd, scored, lengths, prompts, cfg, device, quiet=not first)
        )
    return results


def evaluate_recall(models, lengths, cfg: EvalConfig, device) -> list[sc.Result]:
    """Answer accuracy by (length, distance) of recall checkpoints (pipeline/recall_probe.py),
    and with ``recall_by_generation`` that of greedily generated answers beside it
    (pipeline/recall_generation.py), written into out_dir all at once; each model's rows in
    its Result's ``recall``."""
    results = []
    for model in models:
        log.info("%s: recall accuracy at lengths %s", model.name, lengths)
        rows = recall_probe.score(model, lengths, cfg.distances, cfg.recall_sequences,
                                  cfg.batch_tokens, device)  # fmt: skip
        if cfg.recall_by_generation:
            log.info("%s: recall by greedy generation on the same sequences", model.name)
            recall_generation.add_generated(rows, model, cfg.recall_sequences,
                                            cfg.batch_tokens, device)  # fmt: skip
        results.append(sc.Result(model.label, recall=rows))
    write_recall(results, models, Path(cfg.out_dir))
    return results


def context_group(processes: int, device: torch.device, layout: str = "contiguous"):
    """(group, device): with context_parallel = P > 1, the P processes of this launch
    (torchrun sets them up; each window is split across all of them, in ``layout``:
    ``distributed.LAYOUTS``), each on its own GPU."""
    if processes == 1:
        return None, device
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                f"context_parallel={processes} needs {processes} processes: launch "
                f"torchrun --standalone --nproc-per-node {processes} eval.py ..."
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != processes:
        raise ConfigError(
            f"context_parallel={processes} but {dist.get_world_size()} processes were launched"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    distributed.set_layout(dist.group.WORLD, layout)  # every rank: the same config
    return dist.group.WORLD, device


def score_model(model, split, docs, scored, lengths, prompts, cfg, device, quiet=False):
    """A model's Result: perplexity at every length, prompting curve, position profile."""
    res = sc.Result(model.label, documents=scored)
    cap = cfg.max_tokens_per_document
    total = sum(sc.planned_tokens(split, docs, n, cap, cfg.window, cfg.stride) for n in lengths)
    with Progress(total + len(docs) * len(prompts), desc=model.name, quiet=quiet) as bar:
        for n in lengths:
            try:
                m = sc.measure(model, split, docs, n, cfg.batch_tokens, device, cap, bar,
                               cfg.window, cfg.stride)  # fmt: skip
            except (ValueError, RuntimeError) as err:
                reason = sc.not_reached(err)
                if reason is None:
                    raise
                res.lengths[n] = sc.AtLength(n, reason=f"not reached: {reason}")
                continue
            ppl = math.exp(m.nll / m.tokens)
            res.lengths[n] = sc.AtLength(n, ppl, m.tokens, m.windows, nll=m.nll, bytes=m.bytes)
            # the profile at every length: inside the training window it shows how far back
            # the model uses its context; beyond it, whether later positions still gain
            mean = m.sums / m.counts.clamp(min=1)
            buckets = sc.position_buckets(mean.masked_fill(m.counts == 0, math.nan))
            res.positions += [(n, lo, hi, nll) for lo, hi, nll in buckets]
        if prompts:
            res.prompting, res.prompting_bpb = sc.prompting(model, split, docs, prompts,
                                                            cfg.suffix, device, bar)  # fmt: skip
    reached = [n for n, a in res.lengths.items() if a.ppl is not None]
    if cfg.span_windows and reached and reached[-1] >= 2 * cfg.span_length and not model.hf:
        n = reached[-1]
        starts = sc.windows_at(split, docs, n, cap)[: cfg.span_windows]
        # context parallel: each rank runs its slice of every window, as scoring does (the
        # whole window on every rank would be P times the work and the memory); a failure on
        # any rank raises RankFailed on every rank, which not_reached reads like the failure
        nll_fn = None if model.group is None else (lambda w: sc.model_nll(model, w))
        try:
            res.span = span_probe.probe(model.net, sc.gather(split, starts, n, device),
                                        cfg.span_length, cfg.span_distances, nll_fn)  # fmt: skip
        except (ValueError, RuntimeError) as err:
            if sc.not_reached(err) is None:
                raise
            log.warning("%s: repeated-span probe not run at %d: %s", model.name, n, err)
    return res

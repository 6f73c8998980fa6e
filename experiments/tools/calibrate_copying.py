"""Calibrating a recipe with which a small language model learns to copy: a plain loop for fast
iteration, measuring what matters every ``--eval-every`` steps.

    python -m experiments.tools.calibrate_copying NAME [--stages 64:800:0.5,512:1700:0.1]
        [--alphabet 512] [--attention dense] [--norm pre] [--position rope] [--init torch]
        [--tie] [--load state.pt] ...

Why a loop and not train.py: a calibration asks one question per run (does the copying circuit
form, and does it carry over to natural text?) and wants the answer on natural validation text
while it trains, at two context lengths and at several copy distances; train.py validates at
its own length only. The model (``models.TransformerLM``), the token cache (``data.prepare``),
the repeated-sequence windows (``data/copying.py``) and the span probe
(``pipeline/span_probe.py``) are the repository's own; the loop is AdamW (betas 0.9/0.98, no
weight decay), clipping at 1, warm-up then cosine to ``--min-lr``, the mean NLL over scored
targets, fp32. The recipe it finds is then run through train.py (configs/recipe/).

Stages ``LEN:STEPS:FRACTION``: STEPS steps of ``--tokens`` tokens per step in windows of LEN
tokens, FRACTION of them repeated sequences. Every ``--eval-every`` steps, on 48 in-document
validation windows of 513 tokens: perplexity with 512 tokens of context and with 64 (the same
tokens in 64-token windows), the mean NLL by position bucket, and the repeated-span drop at
d = 32..256 (16 windows, span 32). One JSON line each to ``<out>/NAME/log.jsonl``; the state
is saved with each line, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.config import DataConfig
from data.copying import CopyMix, frequent_tokens
from data.corpus import prepare
from models.transformer import ModelConfig, TransformerLM
from pipeline.provenance import meta
from pipeline.span_probe import probe

BUCKETS = [(0, 8), (8, 32), (32, 64), (64, 128), (128, 256), (256, 512)]


def arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--out", default="runs/calibrate_copying")
    p.add_argument("--stages", default="64:800:0.5,512:1700:0.1")
    p.add_argument("--alphabet", type=int, default=512, help="most frequent tokens drawn from")
    p.add_argument("--attention", default="dense")
    p.add_argument("--segments", default="64,128,256,512")
    p.add_argument("--rates", default="1,2,4,8")
    p.add_argument("--norm", default="pre")
    p.add_argument("--position", default="rope")
    p.add_argument("--init", default="torch")
    p.add_argument("--tie", action="store_true", help="tie the output layer to the embedding")
    p.add_argument("--embed-std", type=float, help="then re-draw the input embedding at this std")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=0.1, help="final lr / peak lr")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--load", help="a state.pt of another calibration run: start from its weights")
    return p.parse_args(argv)


def parse_stages(text: str) -> list[tuple[int, int, float]]:
    stages = []
    for part in text.split(","):
        length, steps, fraction = part.split(":")
        stages.append((int(length), int(steps), float(fraction)))
    return stages


def validation_windows(split, count: int = 48, length: int = 513) -> torch.Tensor:
    """``(count, length)`` disjoint windows inside validation documents, a fixed sample."""
    starts = []
    for d in np.flatnonzero(split.lengths >= 2 * length + 74):
        base, n = int(split.starts[d]), int(split.lengths[d])
        starts += [base + o for o in range(0, n - length, length)]
    pick = np.random.default_rng(0).permutation(len(starts))[:count]
    rows = [split.tokens[starts[i] : starts[i] + length].astype(np.int64) for i in pick]
    return torch.from_numpy(np.stack(rows))


def token_nll(net: TransformerLM, windows: torch.Tensor) -> torch.Tensor:
    """``(W, L)`` float64 NLL of each target of ``windows (W, L + 1)``."""
    logp = F.log_softmax(net(windows[:, :-1]).float(), dim=-1)
    return -logp.gather(-1, windows[:, 1:, None]).squeeze(-1).double()


@torch.no_grad()
def evaluate(net: TransformerLM, windows: torch.Tensor) -> dict:
    net.eval()
    full = token_nll(net, windows)  # (W, 512): 512 tokens of context
    short = token_nll(net, torch.cat([windows[:, :-1].reshape(-1, 64),
                                      windows[:, 1:].reshape(-1, 64)[:, -1:]], 1))  # fmt: skip
    position = full.mean(0)
    rows = probe(net, windows[:16], span=32)
    net.train()
    ppl, ppl_short = math.exp(full.mean()), math.exp(short.mean())
    return {
        "ppl512": ppl,
        "ppl64": ppl_short,
        "gain": 1 - ppl / ppl_short,  # perplexity at 512 below perplexity at 64
        "nll_by_position": {f"{a}-{b}": float(position[a:b].mean()) for a, b in BUCKETS},
        "span_drop": {r["distance"]: r["drop"] for r in rows},
    }


class Batches:
    """Training batches: natural windows at random offsets of the train split, a fraction
    replaced by repeated sequences (the same generator as data.copy_fraction)."""

    def __init__(self, split, alphabet: np.ndarray, tokens: int, seed: int):
        self.split, self.alphabet, self.tokens, self.seed = split, alphabet, tokens, seed

    def __call__(self, step: int, length: int, fraction: float):
        mix = CopyMix(fraction, self.alphabet, length, self.seed)
        rng = np.random.default_rng([self.seed, step])
        inputs, labels = [], []
        for row in range(max(1, self.tokens // length)):
            replaced = mix.window(step, row)
            if replaced is None:
                s = int(rng.integers(0, len(self.split.tokens) - length - 1))
                chunk = torch.from_numpy(self.split.tokens[s : s + length + 1].astype(np.int64))
                replaced = chunk[:-1], chunk[1:]
            inputs.append(replaced[0])
            labels.append(replaced[1])
        return torch.stack(inputs), torch.stack(labels)


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, total - args.warmup)
    return args.lr * (args.min_lr + (1 - args.min_lr) * 0.5 * (1 + math.cos(math.pi * t)))


def build(args, vocab_size: int) -> TransformerLM:
    cfg = ModelConfig(
        vocab_size=vocab_size, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
        d_ff=args.d_ff, attention=args.attention, norm=args.norm, position=args.position,
        init=args.init, tie_embeddings=args.tie,
        segment_lengths=[int(x) for x in args.segments.split(",")],
        dilation_rates=[int(x) for x in args.rates.split(",")],
    )  # fmt: skip
    net = TransformerLM(cfg)
    if args.embed_std is not None:  # which part of an init matters: the embedding's scale alone
        torch.nn.init.normal_(net.embed.weight, std=args.embed_std)
    return net


def restore(out: Path, net, opt, load: str | None) -> tuple[int, int, float]:
    """(step, tokens, seconds) of the run saved in ``out``, its weights and optimizer state
    loaded; a fresh run starts at 0, from ``load``'s weights if given."""
    state_path = out / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        return state["step"], state["tokens"], state["seconds"]
    if load:
        net.load_state_dict(torch.load(load, weights_only=False)["net"])
    return 0, 0, 0.0


def step_once(net, opt, inputs: torch.Tensor, labels: torch.Tensor, lr: float) -> float:
    """One optimizer step on the mean NLL of the scored targets; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = F.cross_entropy(net(inputs).flatten(0, 1), labels.flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def save(out: Path, net, opt, step: int, tokens: int, seconds: float) -> None:
    state = {"net": net.state_dict(), "opt": opt.state_dict(), "step": step,
             "tokens": tokens, "seconds": seconds}  # fmt: skip
    torch.save(state, out / "state.pt.tmp")
    os.replace(out / "state.pt.tmp", out / "state.pt")


def main(argv=None) -> int:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus = prepare(DataConfig(vocab_size=args.vocab, seq_len=512))
    train = corpus.split("train")
    alphabet = frequent_tokens(train.tokens, corpus.vocab_size, args.alphabet, corpus.eod)
    batches = Batches(train, alphabet, args.tokens, args.seed)
    windows = validation_windows(corpus.split("val"))
    net = build(args, corpus.vocab_size)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    stages = parse_stages(args.stages)
    total, bounds = sum(s[1] for s in stages), np.cumsum([s[1] for s in stages])
    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    step, tokens, seconds = restore(out, net, opt, args.load)
    with (out / "log.jsonl").open("a") as log:
        if step == 0:
            log.write(json.dumps({"args": vars(args), "meta": meta()}) + "\n")
            log.write(json.dumps({"step": 0, "tokens": 0, **evaluate(net, windows)}) + "\n")
        while step < total:
            length, _, fraction = stages[int(np.searchsorted(bounds, step, side="right"))]
            t0 = time.perf_counter()
            inputs, labels = batches(step, length, fraction)
            loss = step_once(net, opt, inputs, labels, lr_at(step, total, args))
            seconds += time.perf_counter() - t0
            step, tokens = step + 1, tokens + inputs.numel()
            if step % args.eval_every == 0 or step == total:
                row = {"step": step, "seq_len": length, "tokens": tokens, "train_seconds": seconds,
                       "loss": loss, **evaluate(net, windows)}  # fmt: skip
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), flush=True)
                save(out, net, opt, step, tokens, seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

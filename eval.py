"""Perplexity as context length grows, for one or more checkpoints.

    python eval.py checkpoints=[A.ckpt,B.ckpt] context_lengths=[512,1024,2048] out_dir=DIR \
        [data.source=text_dir data.path=DIR] [split=val] [key=value ...]

Defaults and rules: configs/eval.yaml. Method: lightning_modules/evaluate.py (stated in every
output). Writes ppl_vs_context.{csv,json,png}, prompting.{csv,png} and positions.csv into
out_dir, all at once at the end, so a failed run leaves an existing out_dir untouched.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from lightning_modules import evaluate as ev
from lightning_modules.config import CONFIG_DIR, ConfigError, load_config, run_cli, split_argv

log = logging.getLogger("eval")


def run(argv: list[str]) -> list[ev.Result]:
    files, overrides = split_argv(argv)
    cfg = load_config(files, overrides, default=CONFIG_DIR / "eval.yaml")
    lengths = sorted(int(n) for n in cfg.context_lengths)
    if not cfg.checkpoints or not lengths or min(lengths) < 1 or cfg.suffix < 1:
        raise ConfigError("checkpoints and context_lengths must be non-empty, lengths >= 1")
    cap = cfg.max_tokens_per_document
    if cap is not None and cap < lengths[-1]:
        raise ConfigError(
            f"max_tokens_per_document={cap} must be at least the longest context "
            f"length {lengths[-1]}"
        )
    if cfg.max_documents is not None and cfg.max_documents < 1:
        raise ConfigError(f"max_documents must be at least 1 or null, got {cfg.max_documents}")
    if cfg.split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {cfg.split!r}")
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if cfg.device == "auto"
        else cfg.device
    )
    overrides = dict(cfg.data)
    models = [ev.load_checked(p, overrides, cfg.dense_blockwise, device) for p in cfg.checkpoints]
    splits = [ev.corpus_split(m, cfg.split) for m in models]
    docs = [ev.check_lengths(s, lengths, cfg.split) for s in splits]  # all checks before work
    if cfg.max_documents is not None:
        docs = [dd[: cfg.max_documents] for dd in docs]
    prompts = [p for p in lengths if p >= cfg.suffix]
    results = []
    for model, split, dd in zip(models, splits, docs, strict=True):
        res = ev.Result(model.label, documents=len(dd))
        cap = cfg.max_tokens_per_document
        total = sum(len(ev.windows_at(split, dd, n, cap)) * n for n in lengths)
        with tqdm(total=total + len(dd) * len(prompts), desc=model.name, unit="tok") as bar:
            for n in lengths:
                try:
                    ppl, tokens, windows, mean = ev.perplexity(
                        model, split, dd, n, cfg.batch_tokens, device, cap, bar
                    )
                    res.ppl[n] = (ppl, tokens, windows)
                    if n == lengths[-1]:
                        res.positions = ev.position_buckets(mean)
                except (ValueError, RuntimeError) as err:  # e.g. out of memory, XPOS range
                    res.ppl[n] = f"not reached: {str(err).splitlines()[0][:120]}"
            if prompts:
                try:
                    res.prompting = ev.prompting(model, split, dd, prompts, cfg.suffix, device, bar)
                except (ValueError, RuntimeError) as err:
                    log.warning("prompting curve of %s not reached: %s", model.name, err)
        results.append(res)
    write_outputs(results, lengths, cfg, Path(cfg.out_dir))
    return results


def write_outputs(results, lengths, cfg, out_dir: Path) -> None:
    """Everything into a fresh directory first, then moved into out_dir in one go."""
    tmp = Path(tempfile.mkdtemp(prefix="eval-"))
    corpus = f"{cfg.data.source or 'own corpus'}, {cfg.split} split"
    rows = [
        {
            "model": r.label,
            "context_length": n,
            "ppl": v[0] if isinstance(v, tuple) else "",
            "tokens": v[1] if isinstance(v, tuple) else 0,
            "note": "" if isinstance(v, tuple) else v,
            "documents": r.documents,
        }
        for r in results
        for n, v in r.ppl.items()
    ]
    _csv(tmp / "ppl_vs_context.csv", rows)
    (tmp / "ppl_vs_context.json").write_text(
        json.dumps({"method": ev.POLICY, "corpus": corpus, "rows": rows}, indent=1)
    )
    _csv(
        tmp / "prompting.csv",
        [
            {"model": r.label, "prompt_length": p, "suffix": cfg.suffix, "mean_nll": v}
            for r in results
            for p, v in r.prompting.items()
        ],
    )
    _csv(
        tmp / "positions.csv",
        [
            {"model": r.label, "from": a, "to": b, "mean_nll": v}
            for r in results
            for a, b, v in r.positions
        ],
    )
    cap = cfg.max_tokens_per_document
    title = f"{corpus}; {ev.POLICY}" + (f"; first {cap} tokens of each" if cap else "")
    _plot(
        tmp / "ppl_vs_context.png", results, "ppl", "context length (tokens)", "perplexity", title
    )
    _plot(
        tmp / "prompting.png",
        results,
        "prompting",
        "prompt length (tokens)",
        f"mean NLL of the final {cfg.suffix} tokens",
        corpus,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        shutil.move(str(f), out_dir / f.name)
    tmp.rmdir()
    print(table(results, lengths, title))
    print(f"wrote {out_dir}/ppl_vs_context.{{csv,json,png}}, prompting.{{csv,png}}, positions.csv")


def table(results, lengths, title) -> str:
    head = "| model | docs | " + " | ".join(f"{n}" for n in lengths) + " |"
    lines = [f"perplexity by context length ({title})", head, "|---|---|" + "---|" * len(lengths)]
    for r in results:
        cells = [f"{v[0]:.2f}" if isinstance(v, tuple) else "n/a" for v in r.ppl.values()]
        lines.append(f"| {r.label} | {r.documents} | " + " | ".join(cells) + " |")
    tokens = ["/".join(str(v[1]) for v in r.ppl.values() if isinstance(v, tuple)) for r in results]
    lines.append(f"scored tokens per length: {'; '.join(tokens)}")
    return "\n".join(lines)


def _csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _plot(path, results, key, xlabel, ylabel, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        pts = [
            (n, v[0] if isinstance(v, tuple) else v)
            for n, v in getattr(r, key).items()
            if not isinstance(v, str) and not (isinstance(v, float) and math.isnan(v))
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=r.label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=7, wrap=True)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(run_cli(run, sys.argv[1:]))

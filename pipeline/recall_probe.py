"""Answer accuracy against distance, for checkpoints trained on ``data.source=recall``.

At each evaluation length L and each distance d on a grid (powers of two from 16 up to
L - 4, or the ``distances`` given), ``recall_sequences`` held-out sequences (the test stream:
no training sequence) in which *every* query sits exactly d tokens after its record; a model
answers a query right when the value is its most likely next token. Reported per (model, L, d):
queries, accuracy and mean NLL of the answer. Where a model's structure cannot reach a
distance it is said: a dilated model's segments are aligned blocks, so no layer moves
information across a multiple of its largest segment, and distances at or beyond it are
unreachable.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from data.batch import scored
from data.recall import SLOT, RecallSet, RecallTask
from pipeline.scoring import not_reached

log = logging.getLogger("eval")


def distance_grid(length: int, distances: list[int] | None = None) -> list[int]:
    """Distances scored at ``length``: the given ones that fit, or powers of two from 16."""
    fits = lambda d: SLOT <= d <= length - SLOT  # noqa: E731
    if distances is not None:
        return sorted({int(d) for d in distances if fits(int(d))})
    return [2**k for k in range(4, 40) if fits(2**k)]


def unreachable_from(cfg) -> int | None:
    """The distance from which a model's structure cannot carry information: a dilated
    model's largest segment when every segment length divides it (the paper's schedules:
    every segment of every pair then lies inside one aligned block of the largest, and no
    layer crosses a block's edge); None otherwise."""
    if cfg.attention != "dilated":
        return None
    w = max(cfg.segment_lengths)
    return w if all(w % s == 0 for s in cfg.segment_lengths) else None


def say_reach(name: str, cfg, longest: int) -> None:
    """Logs, for a dilated model evaluated beyond its largest segment, that distances past it
    are unreachable (by construction, not by training)."""
    w = unreachable_from(cfg)
    if w is not None and longest > w:
        log.warning(
            "%s: distances >= %d (its largest segment) are unreachable at any length: "
            "segments are aligned blocks [s*w, (s+1)*w), so no layer moves information across "
            "a multiple of w=%d; context beyond it cannot help",
            name, w, w,
        )  # fmt: skip


@torch.no_grad()
def score(model, lengths: list[int], distances, count: int, batch_tokens: int, device) -> list:
    """Rows ``{model, length, distance, queries, correct, accuracy, nll, note}``."""
    task = RecallTask.of(model.data)
    net, rows = model.net, []
    for length in lengths:
        for d in distance_grid(length, distances):
            data = RecallSet(task, model.data.seed, "test", count, length, distance=d)
            row = {"model": model.label, "length": length, "distance": d, "queries": 0,
                   "correct": 0, "nll_sum": 0.0, "note": ""}  # fmt: skip
            per = max(1, batch_tokens // length)
            try:
                for start in range(0, count, per):
                    items = [data[i] for i in range(start, min(count, start + per))]
                    inputs = torch.stack([x["input_ids"] for x in items]).to(device)
                    labels = torch.stack([x["labels"] for x in items]).to(device)
                    keep = scored(labels)
                    hidden = net.hidden(inputs)[keep]  # (answers, C)
                    logp = F.log_softmax((hidden @ net.lm_head.weight.t()).float(), dim=-1)
                    target = labels[keep]
                    row["queries"] += int(keep.sum())
                    row["correct"] += int((logp.argmax(-1) == target).sum())
                    row["nll_sum"] -= float(logp.gather(1, target[:, None]).sum())
            except (ValueError, RuntimeError) as err:
                reason = not_reached(err)
                if reason is None:
                    raise
                row["note"] = f"not reached: {reason}"
            q = max(row["queries"], 1)
            row["accuracy"] = row["correct"] / q if row["queries"] else math.nan
            row["nll"] = row.pop("nll_sum") / q if row["queries"] else math.nan
            rows.append(row)
    return rows


# the columns the probe by generation adds (eval.py recall_by_generation=true)
GENERATED = ["generated_correct", "generated_accuracy"]


def write(rows: list[dict], models, out_dir: Path) -> list[str]:
    """recall.csv, recall.json, recall_accuracy.png, recall_heatmap.png into ``out_dir``; the
    generated-answer columns (pipeline/recall_generation.py) beside the accuracy when scored."""
    names = ["model", "length", "distance", "queries", "correct", "accuracy"]
    names += [k for k in GENERATED if any(k in r for r in rows)] + ["nll", "note"]
    with open(out_dir / "recall.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        w.writerows(rows)
    (out_dir / "recall.json").write_text(json.dumps(rows, indent=1))
    accuracy_plot(rows, models, out_dir / "recall_accuracy.png")
    heatmap(rows, models, out_dir / "recall_heatmap.png")
    return ["recall.csv", "recall.json", "recall_accuracy.png", "recall_heatmap.png"]


def markers(model) -> dict[str, list[int]]:
    """Where a model's structure says something about distance: its training length, its
    window (sliding) or segment lengths (dilated)."""
    cfg = model.net.config
    out = {"trained at": [model.train_len]} if model.train_len else {}
    if cfg.attention == "dilated":
        out["segments"] = list(cfg.segment_lengths)
    elif cfg.attention == "sliding":
        out["window"] = [cfg.window]
    return out


def accuracy_plot(rows, models, path: Path) -> None:
    """Accuracy against log distance at each model's longest length, one line per model, with
    its markers (dashed: training length; dotted: segments or window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model.label and not r["note"]]
        if not mine:
            continue
        longest = max(r["length"] for r in mine)
        pts = sorted((r["distance"], r["accuracy"]) for r in mine if r["length"] == longest)
        color = f"C{i}"
        ax.plot(
            *zip(*pts, strict=True), marker="o", color=color, label=f"{model.name} (L={longest})"
        )
        for kind, xs in markers(model).items():
            for x in xs:
                ax.axvline(x, color=color, alpha=0.5, lw=1,
                           linestyle="--" if kind == "trained at" else ":")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("record-to-query distance (tokens)")
    ax.set_ylabel("answer accuracy")
    ax.set_title("recall accuracy by distance (dashed: training length; dotted: segments or "
                 "window)", fontsize=8)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heatmap(rows, models, path: Path) -> None:
    """Accuracy over (distance, length), one panel per model; blank where not scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({r["length"] for r in rows})
    dists = sorted({r["distance"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models) + 1, 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        grid = np.full((len(dists), len(lengths)), np.nan)
        for r in rows:
            if r["model"] == model.label and not r["note"]:
                grid[dists.index(r["distance"]), lengths.index(r["length"])] = r["accuracy"]
        im = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(dists)), [str(d) for d in dists], fontsize=7)
        ax.set_xlabel("length L", fontsize=8)
        ax.set_title(model.name, fontsize=8)
    axes[0][0].set_ylabel("distance d", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(row: dict) -> str:
    """The accuracy, and the generated answers' after a slash when scored."""
    if row["note"]:
        return row["note"]
    if "generated_accuracy" in row:
        return f"{row['accuracy']:.2f} / {row['generated_accuracy']:.2f}"
    return f"{row['accuracy']:.2f}"


def table(rows: list[dict]) -> str:
    """Markdown: accuracy by distance (columns) for each (model, length); with the probe by
    generation, ``teacher-forced / generated`` in each cell."""
    from pipeline.display import markdown_table

    dists = sorted({r["distance"] for r in rows})
    keys = sorted({(r["model"], r["length"]) for r in rows}, key=lambda k: (k[0], k[1]))
    cells = []
    for name, length in keys:
        by_d = {r["distance"]: r for r in rows if (r["model"], r["length"]) == (name, length)}
        cells.append([name, str(length)] + [
            _cell(by_d[d]) if d in by_d else "" for d in dists
        ])  # fmt: skip
    return markdown_table(["model", "L"] + [f"d={d}" for d in dists], cells)

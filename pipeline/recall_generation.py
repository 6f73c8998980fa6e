"""The recall probe by generation: a model answers a query with the token it generates greedily
after ``ASK k`` (models/decoding.py: the sequence before the query is prefilled or fed one token
at a time, as given; the answer is the argmax of the decoded logits), on the same held-out
sequences as the teacher-forced probe (pipeline/recall_probe.py). Decoding is exact, so both
mark the same answers correct (tests/test_generate.py checks it query by query,
tests/test_recall_generation.py through eval.py); this is what a harness that only reads
generated text would measure. eval.py runs it with ``recall_by_generation=true``
(:func:`add_generated`: its accuracy beside the teacher-forced one in recall.{csv,json}).
"""

from __future__ import annotations

import math

import torch

from data.batch import scored
from data.recall import RecallSet, RecallTask
from models.decoding import Decoder
from models.transformer import TransformerLM
from pipeline.recall_probe import distance_grid


@torch.no_grad()
def generated_answers(net: TransformerLM, inputs: torch.Tensor, labels: torch.Tensor):
    """``inputs, labels (B, L)`` -> ``(B, L)``: at every scored position the token decoded
    greedily there, -1 elsewhere. The prefill holds everything before the earliest query.
    The decoder plans for all ``L`` tokens, as the full forward of the sequence does: a
    stretched dilated schedule (``stretch_last``) and the XPOS anchor depend on the length, so
    planning for fewer would decode another model than the teacher-forced probe scores."""
    keep = scored(labels)  # (B, L) bool
    positions = keep.any(0).nonzero().squeeze(1)
    out = torch.full_like(inputs, -1)
    if positions.numel() == 0:
        return out
    first, last = int(positions[0]), int(positions[-1])
    decoder = Decoder(net, inputs.shape[0], inputs.shape[1])
    out[:, first] = decoder.prefill(inputs[:, : first + 1]).argmax(-1)
    for t in range(first + 1, last + 1):
        out[:, t] = decoder.step(inputs[:, t]).argmax(-1)
    return out.masked_fill(~keep, -1)


def count_correct(model, data: RecallSet, batch: int, device) -> tuple[int, int]:
    """``(queries, correct)`` over every sequence of ``data``, ``batch`` sequences at once."""
    queries = correct = 0
    for start in range(0, len(data), batch):
        items = [data[i] for i in range(start, min(len(data), start + batch))]
        inputs = torch.stack([x["input_ids"] for x in items]).to(device)  # (b, L)
        labels = torch.stack([x["labels"] for x in items]).to(device)
        answers = generated_answers(model.net, inputs, labels)
        queries += int(scored(labels).sum())
        correct += int(((answers == labels) & scored(labels)).sum())
    return queries, correct


def score(model, lengths: list[int], distances, count: int, batch: int, device) -> list[dict]:
    """Rows ``{model, length, distance, queries, correct, accuracy}``: answers generated
    greedily on the sequences :func:`pipeline.recall_probe.score` scores."""
    task, rows = RecallTask.of(model.data), []
    for length in lengths:
        for d in distance_grid(length, distances):
            data = RecallSet(task, model.data.seed, "test", count, length, distance=d)
            queries, correct = count_correct(model, data, batch, device)
            rows.append({"model": model.label, "length": length, "distance": d,
                         "queries": queries, "correct": correct,
                         "accuracy": correct / queries if queries else float("nan")})  # fmt: skip
    return rows


def add_generated(rows: list[dict], model, count: int, batch_tokens: int, device) -> None:
    """Adds ``generated_correct`` and ``generated_accuracy`` to each of ``model``'s rows of
    :func:`pipeline.recall_probe.score` (its ``count`` sequences per length and distance,
    rebuilt from the same seed and stream, batched as it batches them). A row the
    teacher-forced probe did not reach (its ``note``) is not decoded either: the decoder
    refuses what the full forward cannot run, and a blank says so rather than a zero."""
    task = RecallTask.of(model.data)
    for row in rows:
        if row["model"] != model.label:
            continue
        if row["note"]:
            row["generated_correct"], row["generated_accuracy"] = "", math.nan
            continue
        length = row["length"]
        data = RecallSet(task, model.data.seed, "test", count, length, distance=row["distance"])
        queries, correct = count_correct(model, data, max(1, batch_tokens // length), device)
        if queries != row["queries"]:  # a bug, not user input: the sequences must be the same
            raise RuntimeError(
                f"generated recall scored {queries} queries at length {length}, distance "
                f"{row['distance']}, the teacher-forced probe {row['queries']}"
            )
        row["generated_correct"] = correct
        row["generated_accuracy"] = correct / queries if queries else math.nan

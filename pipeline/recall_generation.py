"""The recall probe by generation: a model answers a query with the token it generates greedily
after ``ASK k`` (models/decoding.py: the sequence before the query is prefilled or fed one token
at a time, as given; the answer is the argmax of the decoded logits), on the same held-out
sequences as the teacher-forced probe (pipeline/recall_probe.py). Decoding is exact, so both
mark the same answers correct (tests/test_generate.py checks it on a trained recall
checkpoint); this is what a harness that only reads generated text would measure.
"""

from __future__ import annotations

import torch

from data.batch import scored
from data.recall import RecallSet, RecallTask
from models.decoding import Decoder
from models.transformer import TransformerLM
from pipeline.recall_probe import distance_grid


@torch.no_grad()
def generated_answers(net: TransformerLM, inputs: torch.Tensor, labels: torch.Tensor):
    """``inputs, labels (B, L)`` -> ``(B, L)``: at every scored position the token decoded
    greedily there, -1 elsewhere. The prefill holds everything before the earliest query."""
    keep = scored(labels)  # (B, L) bool
    positions = keep.any(0).nonzero().squeeze(1)
    out = torch.full_like(inputs, -1)
    if positions.numel() == 0:
        return out
    first, last = int(positions[0]), int(positions[-1])
    decoder = Decoder(net, inputs.shape[0], last + 1)
    out[:, first] = decoder.prefill(inputs[:, : first + 1]).argmax(-1)
    for t in range(first + 1, last + 1):
        out[:, t] = decoder.step(inputs[:, t]).argmax(-1)
    return out.masked_fill(~keep, -1)


def score(model, lengths: list[int], distances, count: int, batch: int, device) -> list[dict]:
    """Rows ``{model, length, distance, queries, correct, accuracy}``: answers generated
    greedily on the sequences :func:`pipeline.recall_probe.score` scores."""
    task, rows = RecallTask.of(model.data), []
    for length in lengths:
        for d in distance_grid(length, distances):
            data = RecallSet(task, model.data.seed, "test", count, length, distance=d)
            queries = correct = 0
            for start in range(0, count, batch):
                items = [data[i] for i in range(start, min(count, start + batch))]
                inputs = torch.stack([x["input_ids"] for x in items]).to(device)  # (b, L)
                labels = torch.stack([x["labels"] for x in items]).to(device)
                answers = generated_answers(model.net, inputs, labels)
                queries += int(scored(labels).sum())
                correct += int(((answers == labels) & scored(labels)).sum())
            rows.append({"model": model.label, "length": length, "distance": d,
                         "queries": queries, "correct": correct,
                         "accuracy": correct / queries if queries else float("nan")})  # fmt: skip
    return rows

"""What a batch is, for every data source: the one contract between data/ and what trains or
scores on it (lightning_modules/, pipeline/).

A batch is a dict:

- ``input_ids`` ``(B, N)`` int64: the window's inputs;
- ``labels`` ``(B, N)`` int64: the target of each input position, or :data:`IGNORE_INDEX`
  where that target is not scored. A language-model window scores every target; a task
  (``data.source=recall``) scores only its answers. The loss, perplexity and accuracy are
  taken over the scored targets alone: this is the only way a source says what is scored;
- ``index``: which window or sequence of the source each row is (named in warnings);
- ``document_starts`` ``(B, N)`` bool, only with ``data.document_mask=true``: True where a
  document starts (a row's first token, and every end-of-document input, which begins the
  next document); attention then stays inside each document (docs/design.md, "Documents
  inside packed windows"). Per-token flags, so that windows collate as they are.

The ignore index lives here, at the bottom of the dependency order, because both sides need
it and ``data/`` imports neither ``models/`` nor ``lightning_modules/`` (docs/design.md).
"""

from __future__ import annotations

import torch

# PyTorch's own default (``F.cross_entropy(ignore_index=-100)``), so a reference loss written
# with plain cross-entropy agrees
IGNORE_INDEX = -100


def scored(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the targets that count, the same shape as ``labels``."""
    return labels != IGNORE_INDEX

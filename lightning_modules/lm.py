"""CausalLM: any ModelConfig trained as a causal language model on the scored targets of a
batch (data/batch.py), optionally with each window split across ``context_parallel`` ranks
(context parallelism, dilated attention).

Loss is token-level cross-entropy in float32 over the scored targets (those whose label is not
``IGNORE_INDEX``: every target of a corpus window, the answers of a task). Validation
perplexity is ``exp(sum of NLL / number of scored targets)`` with both sums kept in float64
and reduced across ranks: never a mean of per-batch perplexities; accuracy is the share of
scored targets that are the most likely next token; bits per byte (``val/bpb``, text sources)
is the summed NLL over the UTF-8 bytes the scored targets cover, times log2(e), both sums
reduced the same way, so that runs with different tokenizers compare. The optimiser and
schedule are lightning_modules/optim.py's. What is not training logic is a callback, wired by
pipeline/build.py: skipping diverged steps (nonfinite.py) and throughput logging
(throughput.py).
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from data.batch import scored
from lightning_modules.context_parallel import (
    check_context_parallel,
    local_slice,
    make_context_group,
    slice_rng,
)
from lightning_modules.optim import OptimConfig, adamw_with_schedule
from models.attention import distributed
from models.attention.documents import Documents
from models.loss import check_chunk, chunked_nll
from models.transformer import ModelConfig, TransformerLM

# every checkpoint carries this key (on_save_checkpoint); a checkpoint with another number was
# written by an incompatible version and is refused (pipeline/checkpoints.py)
FORMAT_KEY, FORMAT = "longnet_lightning_format", 1


def _documents(batch: dict) -> Documents | None:
    """The documents packed in the batch's windows (``data.document_mask=true``: the batch
    carries ``document_starts``, data/batch.py), or None: attention across them."""
    starts = batch.get("document_starts")
    return None if starts is None else Documents.from_starts(starts)


class CausalLM(L.LightningModule):
    def __init__(
        self,
        model: dict,
        optim: dict | None = None,
        *,
        context_parallel: int = 1,
        context_parallel_layout: str = "contiguous",
        loss_chunk: int = 8192,
        run_config: dict | None = None,
    ):
        """``model``: ModelConfig fields; ``optim``: OptimConfig fields (its defaults for the
        missing ones); ``context_parallel``: consecutive ranks that split each window (paper
        3.1), holding it in ``context_parallel_layout`` (``distributed.LAYOUTS``);
        ``loss_chunk``: tokens per chunk of the output layer (no tokens x vocab logits);
        ``run_config``: the whole resolved run config, not read here, kept only so that it
        travels in every checkpoint (pipeline/scoring.py reads it). Plain dicts and numbers,
        so that checkpoints load without this code's classes; a checkpoint saved before
        context_parallel and loss_chunk were arguments loads with their defaults (one
        process; the chunk only bounds memory)."""
        super().__init__()
        self.save_hyperparameters()  # load_from_checkpoint rebuilds from these alone
        self.config = ModelConfig.from_dict(model)
        self.model = TransformerLM(self.config)
        self.optim = OptimConfig.from_dict(optim)
        self.context_parallel = check_context_parallel(context_parallel)
        self.context_parallel_layout = distributed.check_layout(context_parallel_layout)
        self.loss_chunk = check_chunk(loss_chunk)
        self.context_group = None  # this rank's context-parallel group, made in setup
        # (V,) UTF-8 bytes each token id covers (data/token_bytes.py), set by pipeline/build.py
        # from the run's tokenizer; None (a task's word-level tokens): no val/bpb. Not
        # persistent: a checkpoint's tensors do not depend on whether it was set
        self.register_buffer("token_bytes", None, persistent=False)

    def set_token_bytes(self, table: np.ndarray | torch.Tensor) -> None:
        """Logs ``val/bpb`` from now on, with ``table[i]`` the bytes token id i covers."""
        table = torch.as_tensor(table, dtype=torch.int64)
        if table.shape != (self.config.vocab_size,):
            raise ValueError(
                f"token byte table of shape {tuple(table.shape)}: the model has "
                f"{self.config.vocab_size} token ids, one count each"
            )
        self.token_bytes = table.to(self.model.lm_head.weight.device)

    def setup(self, stage: str) -> None:
        if self.context_group is None:
            trainer = self.trainer
            self.context_group = make_context_group(
                self.context_parallel, trainer.world_size, trainer.global_rank,
                self.context_parallel_layout,
            )  # fmt: skip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def _scored(self, batch: dict, batch_idx: int = 0):
        """``(nll (T,), keep (T,), hidden (T, C), labels (T,))`` over the T targets of this
        rank's slice of the window: NLL in float32, 0 where the target is not scored."""
        inputs = local_slice(batch["input_ids"], self.context_group)
        labels = local_slice(batch["labels"], self.context_group).flatten()
        hidden = self._hidden(inputs, batch_idx, _documents(batch)).flatten(0, 1)  # (T, C)
        keep = scored(labels)
        # no T x V logits: the loss runs in chunks; an unscored target is read as token 0 and
        # its NLL zeroed (a mask, not a gather: no host sync, and no copy of every row)
        weight = self.model.lm_head.weight
        nll = chunked_nll(hidden, weight, labels.where(keep, 0), self.loss_chunk)
        return nll.where(keep, 0.0), keep, hidden, labels

    def _hidden(self, inputs: torch.Tensor, batch_idx: int, documents=None) -> torch.Tensor:
        """The model's hidden states of this rank's slice. Split across ranks, the ranks agree
        on the forward once (one small all_gather; the layers then check nothing across ranks)
        until after its backward, whose recomputation re-runs the layers; and each slice draws
        its own dropout masks (:func:`slice_rng`)."""
        group = self.context_group
        if group is None:  # documents with a group are refused (settings/schema.py)
            return self.model.hidden(inputs, documents=documents)
        fp = distributed.fingerprint(self.hparams.model, torch.is_grad_enabled(), self.training)
        distributed.enter_forward(group, inputs, fp)  # left in on_after_backward
        with slice_rng(self.global_step, batch_idx, self.config.dropout > 0 and self.training):
            hidden = self.model.hidden(inputs, group=group)
        if not torch.is_grad_enabled():
            distributed.leave_forward(group)
        return hidden

    def on_after_backward(self) -> None:
        if self.context_group is not None:
            distributed.leave_forward(self.context_group)

    # -- training ----------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The mean NLL of the window's scored targets (the loss to backpropagate)."""
        nll, keep, _, _ = self._scored(batch, batch_idx)
        if self.context_group is None:
            loss = window_loss = nll.sum() / keep.sum()
        else:
            # the window's mean loss is the sum over its P slices; data parallelism averages
            # gradients over all ranks, so each slice's term is scaled by P
            tokens = scored(batch["labels"]).sum()
            loss = nll.sum() * (self.context_parallel / tokens)
            window_loss = nll.detach().sum()
            dist.all_reduce(window_loss, group=self.context_group)
            window_loss = window_loss / tokens
        self.last_window_loss = window_loss.detach()  # written beside checkpoints (preemption.py)
        self.log("train/loss", window_loss, prog_bar=True)
        self.log("train/ppl", window_loss.detach().exp())
        return loss

    # -- validation: sums, not means ---------------------------------------------------------

    def on_validation_epoch_start(self):
        # summed NLL, scored targets, correct ones, UTF-8 bytes the scored targets cover
        self._sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int):
        nll, keep, hidden, labels = self._scored(batch)
        self._sums[0] += nll.double().sum()
        self._sums[1] += keep.sum()
        self._sums[2] += self._correct(hidden[keep], labels[keep])
        if self.token_bytes is not None:  # this rank's slice: the ranks' sums add up
            self._sums[3] += self.token_bytes[labels.where(keep, 0)].where(keep, 0).sum()

    def _correct(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """How many of ``labels (T,)`` are the argmax of their logits, in chunks of tokens."""
        weight, c = self.model.lm_head.weight, self.loss_chunk
        count = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for h, y in zip(hidden.split(c), labels.split(c), strict=True):
            count += ((h @ weight.t()).argmax(-1) == y).sum()
        return count

    def on_validation_epoch_end(self):
        sums = self.trainer.strategy.reduce(self._sums, reduce_op="sum")
        nll_sum, tokens, correct, nbytes = sums
        loss = nll_sum / tokens.clamp(min=1)
        self.log("val/loss", loss.float(), sync_dist=False, prog_bar=True)
        self.log("val/ppl", loss.exp().float(), sync_dist=False, prog_bar=True)
        self.log("val/tokens", tokens.float(), sync_dist=False)
        accuracy = correct / tokens.clamp(min=1)
        self.log("val/accuracy", accuracy.float(), sync_dist=False, prog_bar=True)
        if self.token_bytes is not None:
            bpb = nll_sum / nbytes.clamp(min=1) / math.log(2)
            self.log("val/bpb", bpb.float(), sync_dist=False)

    # -- optimiser ---------------------------------------------------------------------------

    def configure_optimizers(self):
        return adamw_with_schedule(self.parameters(), self.optim, self.trainer.max_steps)

    # -- exact resume: the RNG too ------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[FORMAT_KEY] = FORMAT
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

"""This repository's checkpoints as an lm-evaluation-harness model, ``longnet``.

lm-eval finds models in its own registry, with no entry points for other packages, so this
module registers ``longnet`` when imported and, run as a program, is lm-eval's command line::

    python -m pipeline.lm_eval_model --model longnet \\
        --model_args checkpoint=runs/demo/checkpoints/last.ckpt,max_length=2048 \\
        --tasks wikitext --device cpu

``loglikelihood_rolling`` uses lm-eval's own ``get_rolling_token_windows`` with the end-of-
document token as the start token, which is eval.py's ``window=rolling`` (pipeline/windows.py);
tests/test_lm_eval.py checks that the sums agree. The extra ``lm-eval`` installs lm-eval.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from data.corpus import EOD, load_tokenizer
from models.generation import generate
from pipeline import scoring as sc


@register_model("longnet")
class LongNetLM(LM):
    """``checkpoint``: a run's checkpoint (its tokenizer.json beside the run); ``max_length``:
    the context of each window (default: the run's training length)."""

    def __init__(self, checkpoint: str, max_length: int | None = None, device: str = "cpu",
                 batch_size: int = 1, **_):  # fmt: skip
        super().__init__()
        self._device = torch.device(device)
        self.model = sc.load_checked(checkpoint, {}, False, self._device)
        if not self.model.data.tokenizer_path:
            raise ValueError(f"checkpoint {checkpoint!r} has no tokenizer.json beside its run")
        self.tok = load_tokenizer(self.model.data.tokenizer_path)
        self.eod = self.tok.token_to_id(EOD)
        self.max_length = int(max_length or self.model.train_len or 2048)

    def _logp(self, ids: list[int]) -> torch.Tensor:
        """(S-1, V) float64 log-probabilities of each next token of ``ids``."""
        x = torch.tensor([ids], device=self._device)
        with torch.no_grad():
            return torch.log_softmax(self.model.net(x[:, :-1])[0].double(), -1).cpu()

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether it is the greedy continuation)."""
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self.tok.encode(context).ids if context else [self.eod]
            cont = self.tok.encode(continuation).ids
            ids = (ctx + cont)[-(self.max_length + 1) :]  # (S,), the last L+1 tokens
            logp = self._logp(ids)[-len(cont) :]  # (len(cont), V)
            target = torch.tensor(cont)
            total = logp.gather(-1, target[:, None]).sum().item()
            out.append((total, bool((logp.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of each whole text: lm-eval's rolling windows of ``max_length``."""
        out = []
        for req in requests:
            (text,) = req.args
            total = 0.0
            for window in get_rolling_token_windows(self.tok.encode(text).ids, self.eod,
                                                    self.max_length, 1):  # fmt: skip
                ctx, pred = make_disjoint_window(window)
                logp = self._logp(ctx + pred)[-len(pred) :]
                total += logp.gather(-1, torch.tensor(pred)[:, None]).sum().item()
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy continuation (models/generation.py), cut at the first stop string."""
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            ids = (self.tok.encode(context).ids or [self.eod])[-self.max_length :]
            prompt = torch.tensor([ids], device=self._device)
            new = kwargs.get("max_gen_toks", 256)
            gen = generate(self.model.net, prompt, new, temperature=0.0, eos_id=self.eod)
            text = self.tok.decode(gen.tokens[0, gen.prompt_len :].tolist())
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()

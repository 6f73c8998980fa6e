"""Samples continuations of a prompt from a checkpoint, with its own tokenizer.

    python generate.py checkpoint=runs/demo/checkpoints/last.ckpt prompt="def main(" \
        [max_new_tokens=200] [temperature=0.8] [top_k=40] [top_p=0.95] [seed=1234] \
        [num_samples=4] [prompt_file=PATH | prompt_file=-] [out=samples.json] [--print-config]

Defaults and their meaning: configs/generate.yaml (generated from settings/schema.py). The
first sample is printed to stdout as its tokens arrive, the others when all are done; a summary
(prefill and decode tokens/s, cache size) goes to stderr, and with ``out=`` a JSON of the
samples with the same numbers and the run's provenance. Decoding is exact and cached
(models/decoding.py): the logits are the full forward's, and a dilated model's cache stays
bounded by its schedule. A bad value exits 2 with a message naming it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer

from data.corpus import EOD
from models.decoding import DecodeError
from models.generation import generate
from pipeline.provenance import write_results
from pipeline.scoring import load_checked
from settings.cli import run_cli
from settings.loading import ConfigError, merge, split_argv, to_dataclass
from settings.schema import GenerateConfig

log = logging.getLogger("generate")


def load_generate_config(files=(), overrides=()) -> GenerateConfig:
    """Defaults, files, then ``key=value`` (settings/loading.py), except that ``prompt=`` and
    ``prompt_file=`` are taken verbatim, not parsed as YAML: ``prompt=def f(x):`` stays that
    text, ``prompt_file=-`` that path."""
    verbatim = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ("prompt", "prompt_file"):
            verbatim[key] = value
    rest = [item for item in overrides if item.partition("=")[0] not in verbatim]
    cfg = merge(GenerateConfig, files, rest)
    for key, value in verbatim.items():
        cfg[key] = value
    return to_dataclass(GenerateConfig, cfg)


def read_prompt(cfg: GenerateConfig) -> str:
    """The prompt text: ``prompt``, or ``prompt_file`` read as UTF-8 (``-``: stdin)."""
    if cfg.prompt is not None:
        return cfg.prompt
    path = cfg.prompt_file
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"prompt_file={path!r} cannot be read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"prompt_file={path!r} is not UTF-8 text: {err}") from None
    if not text:
        raise ConfigError(f"prompt_file={path!r} is empty: the prompt needs at least one token")
    return text


def tokenizer_of(checkpoint: str) -> Tokenizer:
    """The run's own tokenizer, saved beside its checkpoints directory."""
    path = Path(checkpoint).resolve().parent.parent / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"checkpoint={checkpoint!r}: its run has no tokenizer at {str(path)!r}")
    return Tokenizer.from_file(str(path))


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    try:
        ids = tokenizer.encode(text).ids
    except Exception as err:  # the tokenizers library raises a bare Exception
        raise ConfigError(f"prompt {text[:60]!r} cannot be tokenized: {err}") from None
    if not ids:
        raise ConfigError(f"prompt {text[:60]!r} holds no token for this run's tokenizer")
    return ids


class Stream:
    """Prints one sample's text as its tokens arrive; waits while the text ends in an
    incomplete UTF-8 character (byte-level tokens)."""

    def __init__(self, tokenizer: Tokenizer, row: int, eos_id: int | None):
        self.tokenizer, self.row, self.eos_id = tokenizer, row, eos_id
        self.ids, self.shown, self.ended = [], "", False

    def __call__(self, tokens: torch.Tensor) -> None:
        token = int(tokens[self.row])
        if self.ended or token == self.eos_id:
            self.ended = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[len(self.shown) :], end="", flush=True)
            self.shown = text


def continuation(tokens: list[int], eos_id: int | None) -> tuple[list[int], bool]:
    """The new tokens up to (not including) the first end token, and whether there was one."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id)], True
    return tokens, False


def main(argv: list[str] | GenerateConfig) -> dict:
    cfg = argv if isinstance(argv, GenerateConfig) else load_generate_config(*split_argv(argv))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available; use device=auto or cpu")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    text = read_prompt(cfg)
    model = load_checked(cfg.checkpoint, {}, False, device)
    tokenizer = tokenizer_of(cfg.checkpoint)
    ids = encode(tokenizer, text)
    eos_id = tokenizer.token_to_id(EOD) if cfg.stop_at_eos else None
    prompt = torch.tensor([ids] * cfg.num_samples, device=device)  # (num_samples, P)
    stream = Stream(tokenizer, 0, eos_id) if cfg.stream else None
    generator = torch.Generator(device).manual_seed(cfg.seed)
    if stream is not None:
        print(("--- sample 0 ---\n" if cfg.num_samples > 1 else "") + text, end="", flush=True)
    try:
        out = generate(model.net, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                       cfg.top_p, generator, eos_id, cfg.prefill_chunk, stream)  # fmt: skip
    except DecodeError as err:
        raise ConfigError(f"{cfg.checkpoint}: {err}") from None
    samples = []
    for row in out.tokens[:, len(ids) :].tolist():
        new, ended = continuation(row, eos_id)
        samples.append(dict(text=tokenizer.decode(new), tokens=new, stopped_at_eos=ended))
    show(text, samples, stream)
    result = summary(cfg, model.name, text, ids, samples, out, device)
    if cfg.out:
        write_results(cfg.out, result)
    return result


def show(prompt: str, samples: list[dict], stream: Stream | None) -> None:
    """Every sample's text on stdout (the first one's rest, when it was streamed)."""
    for i, sample in enumerate(samples):
        if i == 0 and stream is not None:
            print(sample["text"][len(stream.shown) :], flush=True)
            continue
        if len(samples) > 1:
            print(f"--- sample {i} ---")
        print(prompt + sample["text"], flush=True)


def summary(cfg, name, text, ids, samples, out, device) -> dict:
    """The samples, tokens/s of prefill (prompt tokens of every sample) and decode (new
    tokens of every sample, after the prefill), and the cache's size; logged on stderr."""
    made = out.new_tokens * len(samples)
    prefill_tps = len(ids) * len(samples) / max(out.prefill_s, 1e-9)
    decode_tps = made / max(out.decode_s, 1e-9)
    log.info(
        "%s: prompt of %d tokens x %d, prefill %.3f s (%.0f tokens/s); %d new tokens x %d in "
        "%.3f s (%.1f tokens/s); cache %.2f MiB",
        name, len(ids), len(samples), out.prefill_s, prefill_tps, out.new_tokens, len(samples),
        out.decode_s, decode_tps, out.cache_bytes / 2**20,
    )  # fmt: skip
    return dict(
        checkpoint=cfg.checkpoint, model=name, prompt=text, prompt_tokens=len(ids),
        samples=samples, new_tokens=out.new_tokens, prefill_s=out.prefill_s,
        prefill_tokens_per_s=prefill_tps, decode_s=out.decode_s, decode_tokens_per_s=decode_tps,
        cache_mib=out.cache_bytes / 2**20, device=str(device), config=asdict(cfg),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], load=load_generate_config))

"""Decoding cost against context: tiny LongNet against the tiny dense Transformer, batch 1.

    python -m experiments.bench.decode                 # 1K, 4K, 16K, 64K (long on 2 cores)
    python -m experiments.bench.decode --sizes 256 1024 --new 8 --out /tmp/decode  # a smoke run

For each model (configs/model/longnet_tiny.yaml: the paper's schedule / 16; the same with
``stretch_last``: its last segment grows to the context; configs/model/transformer_tiny.yaml:
the same width and depth, dense) and each context N: a random prompt of N tokens is prefilled
(models/decoding.py, in chunks of --prefill-chunk rounded up to the attention's unit), then
--new tokens are decoded one at a time, greedily. Reported: prefill seconds, decode tokens/s
(median seconds per step after the first), and the cache's MiB (its tensors, which equal
models.decoding.cache_bytes). Expected: dense's decode time and cache grow with N; LongNet's
stay flat once N passes its largest segment (2048), the stretched one's cache too. Weights are
random: the cost does not depend on them. Writes experiments/results/decode/decode.csv and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from experiments.bench.measure import RESULTS, K, machine, median
from models.decoding import DecodeError, Decoder, cache_bytes
from models.transformer import TransformerLM
from pipeline import display
from pipeline.provenance import write_results
from settings.loading import model_config_named

MODELS = {  # name -> (configs/model/<file>, changes)
    "longnet_tiny": ("longnet_tiny", {}),
    "longnet_tiny_stretch": ("longnet_tiny", {"stretch_last": True}),
    "transformer_tiny": ("transformer_tiny", {}),
}


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def measure(model: TransformerLM, n: int, new: int, chunk: int, device) -> dict:
    """Prefill seconds, decode seconds per token (median over steps after the first) and the
    cache's bytes, for a prompt of ``n`` random tokens and ``new`` greedy tokens."""
    prompt = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    decoder = Decoder(model, 1, n + new)
    start = clock(device)
    logits = decoder.prefill(prompt, chunk=chunk)
    prefill_s, steps = clock(device) - start, []
    for _ in range(new):
        start = clock(device)
        logits = decoder.step(logits.argmax(-1))
        steps.append(clock(device) - start)
    assert decoder.nbytes() == cache_bytes(model.config, 1, n + new)  # the documented formula
    step_s = median(steps[1:] or steps)
    return {
        "prefill_s": prefill_s,
        "decode_tok_s": 1 / step_s,
        "cache_mib": decoder.nbytes() / 2**20,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[K, 4 * K, 16 * K, 64 * K])
    p.add_argument("--new", type=int, default=32, help="tokens decoded after each prompt")
    p.add_argument("--prefill-chunk", type=int, default=4 * K, help="prompt tokens per chunk")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS / "decode")
    args = p.parse_args(argv)
    if min(args.sizes) < 1 or args.new < 1 or args.prefill_chunk < 1:
        p.error(f"sizes, --new and --prefill-chunk must be positive, got {args.sizes}, "
                f"{args.new}, {args.prefill_chunk}")  # fmt: skip
    args.device = torch.device(args.device)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        file, changes = MODELS[name]
        cfg = replace(model_config_named(file), **changes)
        model = TransformerLM(cfg).to(args.device).eval()
        for n in args.sizes:
            try:
                row = {"model": name, "context": n, "note": "",
                       **measure(model, n, args.new, args.prefill_chunk, args.device)}  # fmt: skip
            except DecodeError as err:  # what the decoder refuses is a result, not a crash
                row = {"model": name, "context": n, "note": f"not reached: {err}"}
                print(f"{name:22s} N={n:6d}  {row['note'][:100]}", flush=True)
                rows.append({**row, **machine(args.device, torch.float32)})
                continue
            print(f"{name:22s} N={n:6d}  prefill {row['prefill_s']:8.3f} s  decode "
                  f"{row['decode_tok_s']:8.1f} tok/s  cache {row['cache_mib']:8.2f} MiB",
                  flush=True)  # fmt: skip
            rows.append({**row, **machine(args.device, torch.float32)})
    columns = ["model", "context", "prefill_s", "decode_tok_s", "cache_mib", "note"]
    write_results(args.out / "decode.csv", rows, columns=columns + ["device", "threads"])
    cell = lambda r, k, f: format(r[k], f) if k in r else "-"  # noqa: E731
    cells = [[r["model"], str(r["context"]), cell(r, "prefill_s", ".3f"),
              cell(r, "decode_tok_s", ".1f"), cell(r, "cache_mib", ".2f"), r["note"][:60]]
             for r in rows]  # fmt: skip
    print(display.markdown_table(["model", "context", "prefill s", "decode tok/s", "cache MiB",
                                  "note"], cells))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()

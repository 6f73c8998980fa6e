"""``python -m tests.support.fault_runner FAULT_JSON train.py-args...``: train.py with a fault
planted, for tests/test_faults.py, which starts it in a child process (``child``, forked from
tests/support/forkserver.py's server: the same entry point without seconds of imports) and
kills it.

FAULT_JSON is a dict; every key is optional:

- ``"hold_step": n``: training step n (1-based) touches ``marker`` and sleeps until killed.
- ``"hold_validation_after": n``: the validation that follows step n does the same, at its
  first batch.
- ``"hold_write": [name, step]``: the write of checkpoint file ``name`` (``last.ckpt``,
  ``step0000004.ckpt``) at global step ``step`` writes half its bytes to the temporary file,
  touches ``marker`` and sleeps until killed (what a kill in the middle of a write leaves).
- ``"hold_cache_build": true``: the token cache build writes its tokenizer, touches ``marker``
  and sleeps until killed.
- ``"pause_step": [n, seconds]``, ``"pause_validation_after": [n, seconds]``,
  ``"pause_cache_build": seconds``: touch ``marker``, sleep that long, then go on (a signal
  sent meanwhile arrives in the middle of that work).
- ``"nan_steps": [n, ...]``: those training steps (1-based) return a NaN loss.
- ``"hold_eval": true``: eval.py's scoring of the first model touches ``marker`` and sleeps
  until killed; with ``"entry": "eval"`` the process is eval.py instead of train.py.
- ``"file_size_limit": bytes``: the kernel refuses writes past that size (RLIMIT_FSIZE,
  EFBIG, as a quota or a full disk would), from the start of the process.
- ``"marker": path``: the file touched when a hold is reached.

The process is train.py's own entry point (settings.cli.run_cli over pipeline.training.train);
only the named functions are wrapped, in this process.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def hold(marker: str, seconds: float = float("inf")) -> None:
    Path(marker).touch()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.05, end - time.monotonic()) if seconds < 1e9 else 60)


def plant(fault: dict) -> None:
    from lightning_modules import lm
    from pipeline import checkpoints

    marker = fault.get("marker", "")
    module_cls = lm.CausalLM

    step_of = lambda module: module.trainer.global_step + 1  # noqa: E731 (1-based, running)
    train_step = module_cls.training_step

    def training_step(self, batch, batch_idx):
        if fault.get("hold_step") == step_of(self):
            hold(marker)
        if fault.get("pause_step", [None])[0] == step_of(self):
            hold(marker, fault["pause_step"][1])
        loss = train_step(self, batch, batch_idx)
        if step_of(self) in fault.get("nan_steps", ()):
            loss = loss * float("nan")
        return loss

    module_cls.training_step = training_step

    val_step = module_cls.validation_step

    def validation_step(self, batch, batch_idx):
        if self.trainer.training is False and self.trainer.state.fn == "fit":
            after = self.trainer.global_step
            if fault.get("hold_validation_after") == after:
                hold(marker)
            if fault.get("pause_validation_after", [None])[0] == after and batch_idx == 0:
                hold(marker, fault["pause_validation_after"][1])
        return val_step(self, batch, batch_idx)

    module_cls.validation_step = validation_step

    if "hold_write" in fault:
        name, step = fault["hold_write"]
        original = checkpoints.atomic_write

        def atomic_write(path, write):
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            if (
                Path(path).name != name
                or checkpoints.torch.load(io.BytesIO(data), weights_only=False).get("global_step")
                != step
            ):
                return original(path, lambda f: f.write(data))

            def half_then_hold(f):
                f.write(data[: len(data) // 2])
                f.flush()
                hold(marker)

            return original(path, half_then_hold)

        checkpoints.atomic_write = atomic_write

    if fault.get("hold_cache_build") or fault.get("pause_cache_build"):
        from data import corpus

        build = corpus._build

        def _build(cfg, docs, directory):
            if fault.get("pause_cache_build"):
                hold(marker, fault["pause_cache_build"])
                return build(cfg, docs, directory)
            tmp = directory.with_name(directory.name + ".tmp-held")
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "train.bin").write_bytes(b"\0" * 100)
            hold(marker)

        corpus._build = _build

    if fault.get("hold_eval"):
        from pipeline import evaluation

        def score_model(*args, **kwargs):
            hold(marker)

        evaluation.score_model = score_model


def limit_file_size(size: int) -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def child(fault: dict, argv: list[str], output: str) -> None:
    """A forked child's body: what the command line would do, from the repository root, with
    stdout and stderr (the descriptors and Python's streams, as Popen's merged pipe) going to
    the file ``output``; exits with main's status."""
    os.chdir(ROOT)
    out = open(output, "w", buffering=1)  # noqa: SIM115 (open until the process ends)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    sys.exit(main([json.dumps(fault), *argv]))


def main(argv: list[str]) -> int:
    fault = json.loads(argv[0])
    if "file_size_limit" in fault:
        limit_file_size(fault["file_size_limit"])
    plant(fault)
    from settings.cli import run_cli

    if fault.get("entry") == "eval":
        from pipeline.evaluation import evaluate

        return run_cli(evaluate, argv[1:])
    from pipeline.training import train
    from settings.loading import load_run_config

    return run_cli(train, argv[1:], load=load_run_config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

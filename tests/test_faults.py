"""Faults lose nothing: train.py killed (SIGKILL) inside a step, a validation, a checkpoint write
or the token cache build; preempted (SIGTERM, SIGINT, twice); a NaN loss; damaged checkpoints
and caches; two runs building one cache; a full disk; eval.py killed. Killed and preempted runs
are resumed with ``resume=auto`` and their per-step losses compared with an uninterrupted run
(the tiny config: dropout 0.1 on, so the random state must resume too).

Faults are planted by tests/support/fault_runner.py in a child process running train.py's
entry point, which the test kills once the fault's marker file appears. The child is forked
from tests/support/forkserver.py's server, which imported torch and Lightning once: a process
of its own (pid, signals, exit status) without the seconds a fresh interpreter spends on
imports."""

from __future__ import annotations

import csv
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from data.cache_files import damage
from lightning_modules.lm import FORMAT_KEY, CausalLM
from lightning_modules.nonfinite import NonFiniteLoss
from pipeline import checkpoints
from pipeline.checkpoints import CheckpointWriteError
from pipeline.outputs import metric
from pipeline.training import train
from settings.loading import ConfigError
from tests.support import fault_runner, forkserver

STEPS = 12  # checkpoints every 4 steps (configs/debug/tiny.yaml), validation every 4


def losses_of_last_launch(run: Path) -> dict[int, float]:
    """step -> train/loss of the run's newest launch only (a killed launch's CSV may be cut)."""
    newest = max((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(newest / "metrics.csv", newline="") as f:
        return {
            int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]
        }


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """step -> loss of the uninterrupted run of STEPS steps."""
    from tests.support.runs import tiny_run

    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_run(corpus, run, f"trainer.max_steps={STEPS}"))
    return metric(run, "train/loss")


class Child:
    """train.py's entry point with a fault planted (tests/support/fault_runner.py), in a child
    process: stdout and stderr go together to a file, read by ``output``."""

    def __init__(self, fault: dict, args: list[str], marker: Path):
        fault = {**fault, "marker": str(marker)}
        self.log = marker.with_name(marker.name + ".log")
        target = (dict(os.environ), fault_runner.child, fault, args, str(self.log))
        self.process = forkserver.context().Process(target=forkserver.run_with_env, args=target)
        self.process.start()

    def poll(self) -> int | None:
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def kill(self) -> None:
        self.process.kill()
        self.process.join()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def communicate(self, timeout: float) -> tuple[int, str]:
        """Waits for the exit: (exit status, output); a child still running is killed."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.output()}")
        return self.process.exitcode, self.output()


def start(fault: dict, args: list[str], marker: Path) -> Child:
    return Child(fault, args, marker)


def wait_for(marker: Path, proc: Child, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.poll()} before the fault:\n{proc.output()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("the fault was not reached in time")
        time.sleep(0.05)


def kill_at(fault: dict, args: list[str], tmp_path: Path) -> None:
    """Runs train.py with ``fault`` planted and SIGKILLs it once the fault is reached."""
    marker = tmp_path / "marker"
    proc = start(fault, args, marker)
    wait_for(marker, proc)
    proc.kill()


def signal_at(fault: dict, args: list[str], tmp_path: Path, *signums) -> tuple[int, str]:
    """Runs train.py with ``fault`` planted, sends ``signums`` once it is reached; returns
    (exit status, output)."""
    marker = tmp_path / "marker"
    proc = start(fault, args, marker)
    wait_for(marker, proc)
    for signum in signums:
        proc.send_signal(signum)
        time.sleep(0.2)
    return proc.communicate(timeout=120)


def resume_and_compare(tiny_args, run: Path, straight: dict, first: int) -> None:
    """Resumes ``run`` to STEPS; its losses from step ``first`` (0-based) on equal the
    uninterrupted run's within 1e-6."""
    train(tiny_args(run, f"trainer.max_steps={STEPS}", "resume=auto"))
    resumed = losses_of_last_launch(run)
    assert min(resumed) == first and max(resumed) == STEPS - 1, sorted(resumed)
    for step, loss in resumed.items():
        assert abs(loss - straight[step]) <= 1e-6, (step, loss, straight[step])
    merged = metric(run, "train/loss")  # every step logged once or more, nothing lost
    assert sorted(merged) == list(range(STEPS))
    assert all(abs(merged[s] - straight[s]) <= 1e-6 for s in merged)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == STEPS  # what eval.py and init_from read is the last step
    assert not list((run / "checkpoints").glob("*-v*.ckpt"))  # no versioned copy beside it


# -- killed ----------------------------------------------------------------------------------


def test_killed_inside_a_step(tiny_args, tmp_path, straight):
    run = tmp_path / "run"
    kill_at({"hold_step": 7}, tiny_args(run, f"trainer.max_steps={STEPS}"), tmp_path)
    resume_and_compare(tiny_args, run, straight, first=4)  # the checkpoint of step 4


@pytest.mark.parametrize("name", ["step0000008.ckpt", "last.ckpt"])
def test_killed_while_writing_a_checkpoint(tiny_args, tmp_path, straight, name):
    """Half of the file written when the kill comes: the run resumes from the newest complete
    checkpoint (step 4 if the step file was being written; the step file of step 8 if it was
    last.ckpt, written after it) and the half-written temporary file is removed."""
    run = tmp_path / "run"
    kill_at({"hold_write": [name, 8]}, tiny_args(run, f"trainer.max_steps={STEPS}"), tmp_path)
    partial = list((run / "checkpoints").glob(".*.tmp-*"))
    assert len(partial) == 1 and partial[0].name.startswith(f".{name}")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    resume_and_compare(tiny_args, run, straight, first=4 if name.startswith("step") else 8)
    assert not list((run / "checkpoints").glob(".*.tmp-*"))


def test_killed_during_validation(tiny_args, tmp_path, straight):
    run = tmp_path / "run"
    kill_at({"hold_validation_after": 8}, tiny_args(run, f"trainer.max_steps={STEPS}"), tmp_path)
    resume_and_compare(tiny_args, run, straight, first=8)


def test_killed_while_building_the_cache(corpus, tmp_path, straight):
    """A build killed half-way leaves a temporary folder, never a cache that reads as built;
    the next run builds it whole and trains exactly as a run on a clean cache."""
    from tests.support.runs import tiny_run

    cache = tmp_path / "cache"
    args = lambda run, *extra: [*tiny_run(corpus, run, *extra), f"data.cache_dir={cache}"]  # noqa: E731
    kill_at({"hold_cache_build": True}, args(tmp_path / "killed", "trainer.max_steps=4"), tmp_path)
    assert [p.name.split(".")[-1] for p in cache.iterdir() if p.is_dir()] == ["tmp-held"]
    run = tmp_path / "run"
    train(args(run, "trainer.max_steps=4"))
    built = [p for p in cache.iterdir() if p.is_dir()]
    assert len(built) == 1 and damage(built[0]) is None  # the stale folder is gone
    got = metric(run, "train/loss")
    assert all(abs(got[s] - straight[s]) <= 1e-6 for s in range(4))


# -- preempted -------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preempted_saves_at_the_end_of_the_step(tiny_args, tmp_path, straight, signum):
    run = tmp_path / "run"
    args = tiny_args(run, f"trainer.max_steps={STEPS}")
    status, out = signal_at({"pause_step": [6, 1.5]}, args, tmp_path, signum)
    assert status == 128 + signum, out
    assert f"stopped by {signal.Signals(signum).name} after step 6" in out
    assert "resume=auto" in out.splitlines()[-1]  # how to continue
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    resume_and_compare(tiny_args, run, straight, first=6)


def test_preempted_before_the_first_periodic_checkpoint(tiny_args, tmp_path, straight):
    """The preemption's last.ckpt is the only checkpoint: once resumed, the run's last step
    must land in last.ckpt itself (Lightning used to write last-v1.ckpt beside it, and
    eval.py read the preempted step's weights)."""
    run = tmp_path / "run"
    args = tiny_args(run, f"trainer.max_steps={STEPS}")
    status, out = signal_at({"pause_step": [2, 1.5]}, args, tmp_path, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, out
    resume_and_compare(tiny_args, run, straight, first=2)


def test_second_signal_exits_at_once(tiny_args, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(run, f"trainer.max_steps={STEPS}")
    start_time = time.monotonic()
    status, out = signal_at({"pause_step": [6, 30]}, args, tmp_path, signal.SIGTERM,
                            signal.SIGTERM)  # fmt: skip
    assert status == 128 + signal.SIGTERM and "exiting now" in out
    assert time.monotonic() - start_time < 25  # did not wait for the step
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_preempted_during_validation(tiny_args, tmp_path, straight):
    """The signal comes during the validation after step 8: it finishes, the run saves and
    stops; resuming does not repeat step 9."""
    run = tmp_path / "run"
    args = tiny_args(run, f"trainer.max_steps={STEPS}")
    status, out = signal_at({"pause_validation_after": [8, 1.5]}, args, tmp_path, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, out
    resume_and_compare(tiny_args, run, straight, first=8)


def test_slurm_requeue_handlers_are_kept(monkeypatch, tmp_path):
    """Under SLURM with auto-requeue, Lightning's SIGUSR1 requeue handler stays and its SIGTERM
    handler is still called after ours."""
    from lightning import Trainer
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

    from pipeline.preemption import Preemption

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "job", "SLURM_JOB_ID": "7",
                       "SLURM_NODELIST": "n1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    seen = {}

    preemption = Preemption(tmp_path)

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)})
            seen["replaced"] = preemption._previous[signal.SIGTERM]

    trainer = Trainer(max_steps=1, callbacks=[preemption, Probe()], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(BoringModel())
    usr1 = seen[signal.SIGUSR1]
    assert isinstance(usr1, _HandlersCompose)
    assert any(
        getattr(h, "__name__", "") == "_slurm_sigusr_handler_fn" for h in usr1.signal_handlers
    )
    assert seen[signal.SIGTERM] == preemption._handle and preemption._keep_lightning
    assert isinstance(seen["replaced"], _HandlersCompose)  # Lightning's, called by ours


# -- diverging -------------------------------------------------------------------------------


def test_nan_step_is_skipped(tiny_args, tmp_path, straight):
    """A NaN loss at step 3: not applied (the weights after it equal those after step 2), logged
    with its step and batch; the run goes on with finite losses."""
    run = tmp_path / "run"
    args = tiny_args(run, "trainer.max_steps=4")
    status, out = run_with_fault({"nan_steps": [3]}, args, tmp_path / "m")
    assert status == 0, out
    assert "step 3: non-finite loss or gradient norm" in out and "skipped" in out
    assert "batch 2" in out
    got = metric(run, "train/loss")
    assert got[0] == pytest.approx(straight[0], abs=1e-6) and got[1] == pytest.approx(
        straight[1], abs=1e-6
    )
    assert all(torch.isfinite(torch.tensor(v)) for s, v in got.items() if s != 2)
    opt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["optimizer_states"][0]
    assert {float(s["step"]) for s in opt["state"].values()} == {3.0}  # 4 steps, one not applied


def test_nan_steps_in_a_row_stop_the_run(tiny_args, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(run, f"trainer.max_steps={STEPS}", "optim.max_nonfinite_steps=2")
    status, out = run_with_fault({"nan_steps": [6, 7, 8]}, args, tmp_path / "m")
    assert status == 1, out
    assert "error: step 8: non-finite" in out and "3 consecutive such steps" in out
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4  # the last good checkpoint, untouched
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_nonfinite_stop_policy(tiny_args, tmp_path, monkeypatch):
    real = CausalLM.training_step

    def nan_at_2(self, batch, batch_idx):
        loss = real(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == 1 else loss

    monkeypatch.setattr(CausalLM, "training_step", nan_at_2)
    with pytest.raises(NonFiniteLoss, match="step 2: non-finite .*optim.nonfinite=stop"):
        train(tiny_args(tmp_path / "run", "trainer.max_steps=4", "optim.nonfinite=stop"))


def run_with_fault(fault: dict, args: list[str], marker: Path) -> tuple[int, str]:
    return start(fault, args, marker).communicate(timeout=300)


# -- damaged files ---------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoints_are_skipped(tiny_args, tmp_path, straight, caplog):
    run = tmp_path / "run"
    train(tiny_args(run, "trainer.max_steps=8", f"optim.total_steps={STEPS}"))
    ckpts = run / "checkpoints"
    truncate(ckpts / "last.ckpt")
    truncate(ckpts / "step0000008.ckpt")
    with pytest.raises(ConfigError, match="last.ckpt.* is not a readable PyTorch checkpoint"):
        train(tiny_args(run, "trainer.max_steps=12", f"resume={ckpts / 'last.ckpt'}"))
    with caplog.at_level(logging.WARNING, logger="train"):
        resume_and_compare(tiny_args, run, straight, first=4)
    text = caplog.text
    assert "resume=auto skips" in text and "last.ckpt" in text and "step0000008.ckpt" in text
    assert f"uses {ckpts / 'step0000004.ckpt'} instead" in text


def test_checkpoint_of_another_version_is_refused(tiny_args, tmp_path):
    from pipeline.evaluation import evaluate

    run = tmp_path / "run"
    train(tiny_args(run, "trainer.max_steps=2"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt[FORMAT_KEY] == 1
    ckpt[FORMAT_KEY] = 99
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(ConfigError, match="other.ckpt.* has checkpoint format 99"):
        evaluate([f"checkpoints=[{other}]", "context_lengths=[16]", f"out_dir={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match="checkpoint format 99"):
        train(tiny_args(tmp_path / "run2", "trainer.max_steps=4", f"resume={other}"))


@pytest.mark.parametrize("how", ["truncated", "altered"])
def test_damaged_cache_is_rebuilt(corpus, tmp_path, caplog, how):
    from data.config import DataConfig
    from data.corpus import prepare

    cfg = DataConfig(source="text_dir", path=str(corpus / "corpus"), glob="*.txt",
                     vocab_size=300, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    first = prepare(cfg)
    tokens = first.split("train").tokens.copy()
    bin_file = first.dir / "train.bin"
    if how == "truncated":
        truncate(bin_file)
    else:  # same size, other bytes, a newer modification time
        data = bytearray(bin_file.read_bytes())
        data[10] ^= 0xFF
        bin_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = prepare(cfg)
    assert (
        "is damaged" in caplog.text and "train.bin" in caplog.text and "rebuilding" in caplog.text
    )
    assert (again.split("train").tokens == tokens).all()
    assert damage(again.dir) is None


def test_two_runs_build_one_cache(corpus, tmp_path):
    """Started together on one fresh cache_dir: one builds (slowly, holding the lock), the
    other waits; both train on the same tokens (equal losses: same seed, same data)."""
    from tests.support.runs import tiny_run

    cache = tmp_path / "cache"
    procs = []
    for name in ("a", "b"):
        args = [
            *tiny_run(corpus, tmp_path / name, "trainer.max_steps=3"),
            f"data.cache_dir={cache}",
        ]
        procs.append(start({"pause_cache_build": 3}, args, tmp_path / f"marker-{name}"))
    done = [p.communicate(timeout=300) for p in procs]
    assert [status for status, _ in done] == [0, 0], done
    text = "".join(out for _, out in done)
    assert text.count("training a 300-token byte-level BPE") == 1, text
    assert "waiting for another process" in text
    assert [p.name for p in cache.iterdir() if p.is_dir()].__len__() == 1
    a, b = metric(tmp_path / "a", "train/loss"), metric(tmp_path / "b", "train/loss")
    assert a == b and len(a) == 3


# -- disk full, unwritable -------------------------------------------------------------------


def test_disk_full_during_a_checkpoint(tiny_args, tmp_path, monkeypatch):
    """The write of step 8's checkpoint fails as on a full disk: a clear error naming the
    file, no temporary file left, last.ckpt of step 4 intact."""
    run = tmp_path / "run"
    real = checkpoints.torch.save

    def full(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == 8:
            f.write(b"x" * 100)
            raise OSError(28, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(CheckpointWriteError, match="step0000008.ckpt.*No space left on device"):
        train(tiny_args(run, f"trainer.max_steps={STEPS}"))
    monkeypatch.undo()
    ckpts = run / "checkpoints"
    assert not list(ckpts.glob(".*"))
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 4


def test_real_write_failure_in_a_subprocess(tiny_args, tmp_path, corpus):
    """The kernel refuses the write (a file-size limit, EFBIG, as a quota or a full disk would):
    train.py exits 1 with the error naming the checkpoint; no temporary file is left."""
    run = tmp_path / "run"
    train(tiny_args(tmp_path / "warm", "trainer.max_steps=1"))  # the cache exists: not limited
    args = tiny_args(run, "trainer.max_steps=6")
    status, out = run_with_fault({"file_size_limit": 64 * 1024}, args, tmp_path / "m")
    assert status == 1, out[-2000:]
    assert "error: could not write checkpoint" in out
    assert "step0000004.ckpt" in out and "File too large" in out
    assert not list((run / "checkpoints").glob("*"))


def test_unwritable_run_dir(tiny_args, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="run_dir=.*file/run.* cannot be created"):
        train(tiny_args(blocker / "run", "trainer.max_steps=2"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not a writable directory"):
            train(tiny_args(locked / "run", "trainer.max_steps=2"))


# -- eval.py ---------------------------------------------------------------------------------


def test_killed_eval_leaves_out_dir_as_it_was(tiny_args, tmp_path):
    run = tmp_path / "run"
    train(tiny_args(run, "trainer.max_steps=2"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "ppl_vs_context.csv").write_text("earlier results\n")
    args = [f"checkpoints=[{run / 'checkpoints' / 'last.ckpt'}]", "context_lengths=[16]",
            "split=val", f"out_dir={out}"]  # fmt: skip
    kill_at({"entry": "eval", "hold_eval": True}, args, tmp_path)
    assert [p.name for p in out.iterdir()] == ["ppl_vs_context.csv"]
    assert (out / "ppl_vs_context.csv").read_text() == "earlier results\n"


def test_remote_paths_keep_lightnings_fsspec_writer():
    """A URL (here fsspec's in-memory file system) is not a local path to rename into."""
    import fsspec

    from pipeline.checkpoints import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, "memory://run/last.ckpt")
    with fsspec.open("memory://run/last.ckpt", "rb") as f:
        assert torch.load(f, weights_only=False) == {"global_step": 3}

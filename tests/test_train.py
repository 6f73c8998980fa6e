"""train.py end to end, in process: every attention type, exact resume, config rules, errors."""

import csv
from pathlib import Path

import pytest
import torch

from lightning_modules.lm import CausalLM
from lightning_modules.optim import lr_factor
from pipeline.outputs import metric
from pipeline.training import train
from settings.loading import ConfigError, load_run_config, split_argv


def losses(run: Path) -> dict[int, float]:
    return metric(run, "train/loss")


@pytest.mark.parametrize("attention", ["dilated", "dense", "sparse", "sliding"])
def test_smoke_every_attention(tiny_args, tmp_path, attention):
    run = tmp_path / attention
    trainer = train(tiny_args(run, f"model.attention={attention}", "trainer.max_steps=4"))
    assert trainer.global_step == 4
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "config.yaml").exists() and (run / "tokenizer.json").exists()
    assert torch.isfinite(torch.tensor(trainer.callback_metrics["val/ppl"]))
    module = CausalLM.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert module.config.attention == attention
    assert module.hparams.run_config["model"]["attention"] == attention


@pytest.mark.parametrize("extra", [[], ["model.checkpointing=layer"]], ids=["plain", "recompute"])
def test_resume_gives_the_same_losses(tiny_args, tmp_path, extra):
    """Dropout on (the tiny config's 0.1): resumed runs draw the same masks, with or without
    blocks recomputed in the backward."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_args(straight, "trainer.max_steps=8", *extra))
    # the first leg stops early, as a killed run would; the schedule still plans for 8 steps
    train(tiny_args(split, "trainer.max_steps=4", "optim.total_steps=8", *extra))
    train(tiny_args(split, "trainer.max_steps=8", "resume=auto", *extra))
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(8))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_merge_order(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("seed: 1\nmodel:\n  n_layer: 3\n")
    second.write_text("seed: 2\n")
    cfg = load_run_config([str(first), str(second)], ["seed=3"])
    assert (cfg.seed, cfg.model.n_layer, cfg.model.d_model) == (3, 3, 256)
    assert load_run_config([str(first), str(second)]).seed == 2


@pytest.mark.parametrize(
    "files,overrides,message",
    [
        (["/nonexistent.yaml"], [], "does not exist"),
        ([], ["model.n_layers=3"], "unknown key model.n_layers .* did you mean model.n_layer"),
        ([], ["trainer.max_step=3"], "did you mean trainer.max_steps"),
        ([], ["model.n_layer=three"], "model.n_layer in override .* converted to Integer"),
        ([], ["model.dropout=true"], "model.dropout in .* converted to Float"),
        ([], ["model.attention=sparce"], "expected one of \\['dense', 'dilated', 'sparse'"),
        ([], ["model.dilation_rates=[1,x]"], "model.dilation_rates\\[1\\] in .* Integer"),
        ([], ["seed"], "key=value"),
    ],
)
def test_config_errors(files, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(files, overrides)


def test_yaml_that_does_not_parse(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_run_config([str(bad)])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["resume=/nonexistent.ckpt"], "does not exist"),
        (["model.vocab_size=999"], "does not match the tokenizer"),
        (
            ["model.attention=dense", "data.seq_len=200000", "trainer.max_steps=1"],
            "XPOS scales reach",
        ),
        (["model.attention=sliding", "model.window=0"], "window must be a positive integer"),
    ],
)
def test_bad_runs_fail_before_training(tiny_args, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_args(tmp_path / "run", *extra))
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(tiny_args, tmp_path):
    run = tmp_path / "run"
    train(tiny_args(run, "trainer.max_steps=2"))
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tiny_args(run, "trainer.max_steps=2"))
    not_ckpt = tmp_path / "x.ckpt"
    not_ckpt.write_text("hello")
    with pytest.raises(ConfigError, match="is not a readable PyTorch checkpoint"):
        train(tiny_args(run, f"resume={not_ckpt}"))
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


def test_the_last_step_is_saved_when_it_is_not_a_multiple_of_the_period(tiny_args, tmp_path):
    """800 steps with checkpoints every 250 used to end with last.ckpt at step 750."""
    run = tmp_path / "run"
    train(tiny_args(run, "trainer.max_steps=6", "checkpoint.every_n_steps=4"))
    files = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert files == ["last.ckpt", "step0000004.ckpt", "step0000006.ckpt"]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 6


def test_init_from_copies_weights_only(tiny_args, tmp_path):
    """A curriculum stage: weights from another run, everything else afresh; a resumed run keeps
    its own weights; a model of another shape is refused, naming the tensors."""
    from pipeline.build import build

    first = tmp_path / "first"
    train(tiny_args(first, "trainer.max_steps=2"))
    ckpt = first / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    second = tmp_path / "second"
    args = tiny_args(second, f"init_from={ckpt}", "model.attention=dense")
    _, module, _, resume_from = build(load_run_config(*split_argv(args)))
    assert resume_from is None
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    trainer = train(tiny_args(second, f"init_from={ckpt}", "trainer.max_steps=2"))
    assert trainer.global_step == 2  # the step count starts afresh
    # resuming: the run's own checkpoint wins, init_from is not read (here it no longer exists)
    train(tiny_args(second, "init_from=/gone.ckpt", "trainer.max_steps=3", "resume=auto"))
    with pytest.raises(ConfigError, match=r"does not fit this model \(shapes .* vs \(64,\)"):
        train(tiny_args(tmp_path / "wide", f"init_from={ckpt}", "model.d_model=64"))
    with pytest.raises(ConfigError, match="does not exist"):
        train(tiny_args(tmp_path / "none", "init_from=/gone.ckpt"))


def test_checkpoint_saved_before_the_explicit_arguments_loads(tmp_path):
    """Hyper-parameters of the old signature (model, optim, run_config; context_parallel and
    loss_chunk were read from run_config) still rebuild the module, with their defaults."""
    import lightning

    model = dict(vocab_size=64, d_model=32, n_layer=1, n_head=4, d_ff=64,
                 segment_lengths=[8, 16], dilation_rates=[1, 2])  # fmt: skip
    saved = CausalLM(model, {"lr": 1e-3})
    old = {"model": model, "optim": {"lr": 1e-3},
           "run_config": {"context_parallel": 1, "loss_chunk": 4096}}  # fmt: skip
    ckpt = {"state_dict": saved.state_dict(), "hyper_parameters": old,
            "pytorch-lightning_version": lightning.__version__}  # fmt: skip
    torch.save(ckpt, tmp_path / "old.ckpt")
    module = CausalLM.load_from_checkpoint(tmp_path / "old.ckpt")
    assert module.optim.lr == 1e-3 and (module.context_parallel, module.loss_chunk) == (1, 8192)
    assert module.hparams.run_config["loss_chunk"] == 4096
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, module.state_dict()[name]), name


def test_lr_schedule_shapes():
    assert lr_factor(0, 10, 100, "polynomial", 1.0, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "polynomial", 1.0, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "polynomial", 1.0, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "cosine", 1.0, 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 10, 100, "constant", 1.0, 0.0) == 1.0


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tiny_args, tmp_path):
    """DDP (gloo) trains on different data per rank; validation perplexity and bits per byte
    over all windows equal the single-process values for the same weights."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    run = tmp_path / "ddp"
    common = [
        *tiny_args(
            run,
            "trainer.max_steps=4",
            "trainer.limit_val_batches=1.0",
            "trainer.val_check_interval=4",
        )
    ]
    cmd = [
        sys.executable,
        "train.py",
        *common,
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
    ]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = next((run / "logs").glob("version_*/metrics.csv")).read_text()
    rows = csv.DictReader(log.splitlines())
    ddp_ppl, ddp_bpb = [(float(r["val/ppl"]), float(r["val/bpb"])) for r in rows
                        if r.get("val/ppl")][-1]  # fmt: skip
    # the same weights, validated in one process over the same windows
    from pipeline.build import build, set_token_bytes
    from settings.loading import split_argv

    cfg = load_run_config(*split_argv([*common, f"run_dir={tmp_path / 'single'}"]))
    trainer, _, datamodule, _ = build(cfg)
    module = CausalLM.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    set_token_bytes(module, datamodule.corpus.tokenizer)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert metrics["val/ppl"] == pytest.approx(ddp_ppl, rel=1e-5)
    assert metrics["val/bpb"] == pytest.approx(ddp_bpb, rel=1e-5)  # summed bytes, not means
    # different data per rank: the two ranks' first windows differ
    first = [
        datamodule.train_dataset(rank=r, world_size=2).shard_indices(r, 0)[:4].tolist()
        for r in range(2)
    ]
    assert first[0] != first[1]


def test_command_line_errors_exit_2(capsys):
    from settings.cli import run_cli

    assert run_cli(train, ["model.n_layers=3"]) == 2
    assert "did you mean model.n_layer" in capsys.readouterr().err


def test_progress_in_a_log_is_lines(tiny_args, tmp_path, capfd):
    """Output that is not a terminal gets a line per logging interval, no carriage returns."""
    train(tiny_args(tmp_path / "run", "trainer.max_steps=4", "trainer.enable_progress_bar=true",
                    "trainer.log_every_n_steps=2"))  # fmt: skip
    err = capfd.readouterr().err
    assert "step 2/4" in err and "step 4/4" in err and "validation at step 4" in err
    assert "\r" not in err

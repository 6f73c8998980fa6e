"""The schema is the only source of defaults: generated files are current, shipped YAMLs hold
only differences and load, --print-config shows any command line, errors name key and origin."""

from pathlib import Path

import pytest
import yaml

from settings import generate
from settings.cli import run_cli
from settings.loading import ConfigError, load_eval_config, load_run_config, split_argv

ROOT = Path(__file__).resolve().parents[1]
RUN_YAMLS = sorted(
    p
    for d in ("model", "experiment", "debug", "recipe")
    for p in (ROOT / "configs" / d).glob("*.yaml")
    if not p.name.endswith("_eval.yaml")
)
EVAL_YAMLS = sorted((ROOT / "configs" / "experiment").glob("*_eval.yaml"))


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = prefix + key
        if isinstance(value, dict) and name != "trainer":
            out.update(flat(value, name + "."))
        elif isinstance(value, dict):
            out.update({f"trainer.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("path", EVAL_YAMLS, ids=[p.stem for p in EVAL_YAMLS])
def test_shipped_eval_yamls_load_and_hold_only_differences(path):
    load_eval_config([str(path)], [])
    defaults = flat(yaml.safe_load((ROOT / "configs" / "eval.yaml").read_text()))
    same = {k: v for k, v in flat(yaml.safe_load(path.read_text())).items()
            if k in defaults and defaults[k] == v}  # fmt: skip
    assert not same, f"{path.name} repeats defaults: {same}"


def test_generated_files_are_current():
    """configs/default.yaml and configs/eval.yaml are what settings/generate.py writes."""
    assert generate.main(["--check"]) == 0, "run python -m settings.generate"


@pytest.mark.parametrize("path", RUN_YAMLS, ids=[f"{p.parent.name}/{p.stem}" for p in RUN_YAMLS])
def test_shipped_yamls_load_and_hold_only_differences(path):
    load_run_config([str(path)], ["data.path=/tmp"])  # every key known, every type right
    defaults = flat(yaml.safe_load((ROOT / "configs" / "default.yaml").read_text()))
    same = {k: v for k, v in flat(yaml.safe_load(path.read_text()) or {}).items()
            if k in defaults and defaults[k] == v}  # fmt: skip
    assert not same, f"{path.name} repeats defaults: {same}"


def test_print_config_shows_the_resolved_command_line(capsys):
    argv = ["configs/experiment/demo.yaml", "model.attention=dense", "--print-config"]
    assert run_cli(lambda a: pytest.fail("ran"), argv, load=load_run_config) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["attention"] == "dense" and printed["run_dir"] == "runs/demo"
    assert printed["trainer"]["max_steps"] == 150 and printed["optim"]["warmup_steps"] == 20
    argv = ["checkpoints=[a.ckpt]", "context_lengths=[64]", "--print-config"]
    assert run_cli(lambda a: pytest.fail("ran"), argv, load=load_eval_config) == 0
    assert yaml.safe_load(capsys.readouterr().out)["split"] == "auto"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["checkpoints=[a]", "split=dev"], r"split in override 'split=dev': .*'auto', 'train'"),
        (["checkpoints=[a]", "context_lenghts=[1]"], "did you mean context_lengths"),
        (["checkpoints=[a]", "data.sorce=text_dir"], "did you mean data.source"),
        (["context_lengths=[8]"], "checkpoints and context_lengths must be non-empty"),
        (["checkpoints=[a]", "context_lengths=[64]", "max_tokens_per_document=8"], "at least"),
        (
            ["checkpoints=[a]", "context_parallel_layout=zigzag"],
            r"context_parallel_layout='zigzag' is not one of \('contiguous', 'balanced'\)",
        ),
        (
            [
                "checkpoints=[a]",
                "context_lengths=[16,6,8]",
                "context_parallel=2",
                "context_parallel_layout=balanced",
            ],
            r"context lengths \[6\] must be multiples of 2 x context_parallel=2 for "
            "context_parallel_layout=balanced",
        ),
    ],
)
def test_eval_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_eval_config(*split_argv(argv))


def test_value_checks_name_their_section():
    with pytest.raises(ConfigError, match="^model: d_model=30 must be divisible by n_head=4"):
        load_run_config([], ["model.d_model=30"])
    with pytest.raises(ConfigError, match="^data.seq_len must be a positive integer"):
        load_run_config([], ["data.seq_len=0"])
    with pytest.raises(ConfigError, match="^optim.schedule must be one of|optim.schedule in"):
        load_run_config([], ["optim.schedule=step"])


def test_empty_yaml_is_an_empty_mapping(tmp_path):
    empty = tmp_path / "e.yaml"
    empty.write_text("# nothing but a comment\n")
    assert load_run_config([str(empty)]).model.d_model == 256


def test_loading_the_schema_does_not_import_lightning():
    """A config loads (and default.yaml is generated) without Lightning: settings.schema holds
    OptimConfig from a Lightning-free module."""
    import subprocess
    import sys

    code = (
        "import sys, settings.schema; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_fabric')))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_unknown_optim_key_names_it_and_the_accepted_ones():
    from lightning_modules.optim import OptimConfig

    assert OptimConfig.from_dict({"lr": 1e-3}).lr == 1e-3 and OptimConfig.from_dict(None).lr > 0
    with pytest.raises(ValueError, match=r"unknown optim keys \['lrate'\]; accepted: .*'lr'"):
        OptimConfig.from_dict({"lrate": 1e-3})

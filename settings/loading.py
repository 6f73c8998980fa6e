"""From a command line to a checked config: the schema's defaults, then each YAML file in
order, then each ``key=value``.

The merge runs in OmegaConf's struct mode over the typed schema (settings/schema.py), so a key
the schema does not name, or a value of the wrong type, is an error at the file or override
that brought it, with the closest valid key suggested. ``trainer.*`` keys are checked against
``lightning.Trainer``'s own arguments. Then every section is built as its dataclass, whose
``__post_init__`` checks the values together (a schedule that leaves a head without keys, a
window of 0, ...). Every failure is a :class:`ConfigError` that names the key and the origin.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import fields, is_dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from models.transformer import ModelConfig
from settings.schema import EvalConfig, RunConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@functools.cache
def trainer_keys() -> frozenset[str]:
    """``lightning.Trainer``'s argument names. Lightning is imported here, when a trainer
    section is checked, not with this module: it takes seconds, and what reads eval configs
    or raises ConfigError (scoring, its tests) does not need it."""
    import lightning as L

    return frozenset(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def load_yaml(path: str | Path) -> DictConfig:
    """A YAML file as a mapping (an empty or comment-only file is an empty one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        parsed = yaml.safe_load(path.read_text())  # a clear parse error with line and column
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} does not parse: {err}") from err
    if parsed is None:
        return OmegaConf.create({})
    if not isinstance(parsed, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, not a list")
    return OmegaConf.create(parsed)


def parse_override(item: str) -> DictConfig:
    if "=" not in item or item.startswith("="):
        raise ConfigError(
            f"override {item!r} must look like key=value (e.g. trainer.max_steps=100)"
        )
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError:  # not YAML (a glob such as *.txt): take the value as a string
        key, value = item.split("=", 1)
        nested: object = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        return OmegaConf.create(nested)
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {item!r} does not parse: {err}") from err


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[a.yaml, b.yaml, key=value, ...]`` -> (files, overrides)."""
    return [a for a in argv if "=" not in a], [a for a in argv if "=" in a]


# ----------------------------------------------------------------------------------------------
# merging


def flat_keys(cfg, prefix: str = "") -> list[str]:
    """Dotted names of every key (``trainer`` as one)."""
    out = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig) and name != "trainer":
            out += flat_keys(value, name + ".")
        else:
            out.append(name)
    return out


def _check_trainer(update: DictConfig, origin: str) -> None:
    trainer = update.get("trainer") if isinstance(update, DictConfig) else None
    for key in trainer or {}:
        if key not in trainer_keys():
            close = difflib.get_close_matches(key, sorted(trainer_keys()), n=1)
            hint = f"; did you mean trainer.{close[0]}?" if close else ""
            raise ConfigError(
                f"unknown key trainer.{key} in {origin}: not an argument of lightning.Trainer{hint}"
            )


def _merge_one(cfg: DictConfig, update: DictConfig, origin: str, known: list[str]) -> DictConfig:
    """``update`` merged into ``cfg`` in place: both are merge()'s own (fresh from the schema,
    a file or an override) and dropped on an error, so the deep copy of the whole config that
    OmegaConf.merge makes per file and override (most of a study plan's time) is skipped."""
    _check_trainer(update, origin)
    try:
        return OmegaConf.unsafe_merge(cfg, update)
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown key {key} in {origin}{hint}") from None
    except ValidationError as err:
        message = str(err.msg).splitlines()[0] if err.msg else str(err).splitlines()[0]
        raise ConfigError(f"{err.full_key} in {origin}: {message}") from None


def merge(schema: type, files=(), overrides=()) -> DictConfig:
    """The schema's defaults <- files <- overrides, every key and type checked."""
    cfg = OmegaConf.structured(schema)
    known = flat_keys(cfg)
    for f in files:
        cfg = _merge_one(cfg, load_yaml(f), f"config file {str(f)!r}", known)
    for item in overrides:
        cfg = _merge_one(cfg, parse_override(item), f"override {item!r}", known)
    return cfg


def to_dataclass(schema: type, cfg: DictConfig):
    """The dataclass of a merged config; each section is built on its own, so that a value
    check names its section."""
    parts = {}
    for f in fields(schema):
        node = cfg[f.name]
        if isinstance(node, DictConfig) and is_dataclass(OmegaConf.get_type(node)):
            try:
                parts[f.name] = OmegaConf.to_object(node)
            except ValueError as err:
                text = str(err)
                message = text if text.startswith(f"{f.name}.") else f"{f.name}: {text}"
                raise ConfigError(message) from err
        else:
            parts[f.name] = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
    try:
        return schema(**parts)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def load_run_config(files=(), overrides=()) -> RunConfig:
    return to_dataclass(RunConfig, merge(RunConfig, files, overrides))


def load_eval_config(files=(), overrides=()) -> EvalConfig:
    return to_dataclass(EvalConfig, merge(EvalConfig, files, overrides))


def to_yaml(config) -> str:
    """A config (dataclass or DictConfig) as YAML, as config.yaml files and --print-config
    show it."""
    return OmegaConf.to_yaml(OmegaConf.structured(config) if is_dataclass(config) else config)


def model_config_named(name: str) -> ModelConfig:
    """``configs/model/<name>.yaml`` over the defaults; a vocabulary left null is the default
    tokenizer's (``data.vocab_size``), as a run would set it."""
    path = CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no model config {name!r}; known: {known}")
    cfg = load_run_config([str(path)])
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    return ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": vocab})

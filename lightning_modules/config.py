"""Run configuration: ``configs/default.yaml``, then YAML files in order, then ``key=value``.

``configs/default.yaml`` names every key; it is the schema. A key it does not name is an error
that suggests the closest valid key; a value whose type differs from the default's is an error
(an int where a float is expected is accepted; ``null`` defaults accept anything). ``trainer.*``
keys are checked against ``lightning.Trainer``'s own arguments.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

import lightning as L
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT = CONFIG_DIR / "default.yaml"
# sections whose keys are free-form in default.yaml but checked elsewhere
TRAINER_KEYS = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def _load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        yaml.safe_load(path.read_text())  # a clear parse error with line and column
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"config file {str(path)!r} does not parse: {err}") from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, not a list")
    return loaded


def _flat_keys(cfg, prefix="") -> dict[str, object]:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig) and name != "trainer":
            out.update(_flat_keys(value, name + "."))
        else:
            out[name] = value
    return out


def _check_keys(schema: dict, update: DictConfig, origin: str) -> None:
    for key, value in _flat_keys(update).items():
        if key == "trainer":
            for tkey in value:
                if tkey not in TRAINER_KEYS:
                    close = difflib.get_close_matches(tkey, TRAINER_KEYS, n=1)
                    hint = f"; did you mean trainer.{close[0]}?" if close else ""
                    raise ConfigError(
                        f"unknown key trainer.{tkey} in {origin}: not an "
                        f"argument of lightning.Trainer{hint}"
                    )
            continue
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown key {key} in {origin}{hint}")
        _check_type(key, schema[key], value, origin)


def _check_type(key, default, value, origin) -> None:
    if default is None or value is None:
        return
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) == isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    elif isinstance(default, (list, ListConfig)):
        ok = isinstance(value, (list, ListConfig))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{key} in {origin} must be {type(default).__name__} like its default "
            f"{default!r}, got {value!r} ({type(value).__name__})"
        )


def _parse_override(item: str) -> DictConfig:
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


def load_config(files: list[str] = (), overrides: list[str] = (), default=DEFAULT) -> DictConfig:
    """Merges ``default`` (the schema), each file in order, then each ``key=value``; checks
    every key."""
    cfg = _load_yaml(default)
    schema = _flat_keys(cfg)
    for f in files:
        update = _load_yaml(f)
        _check_keys(schema, update, f"config file {f!r}")
        cfg = OmegaConf.merge(cfg, update)
    for item in overrides:
        update = _parse_override(item)
        _check_keys(schema, update, f"override {item!r}")
        cfg = OmegaConf.merge(cfg, update)
    return cfg


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[a.yaml, b.yaml, key=value, ...]`` -> (files, overrides)."""
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    return files, overrides


def run_cli(entry, argv: list[str]) -> int:
    """Runs a command-line entry point: a ConfigError becomes one line on stderr and exit
    code 2 (nothing else to read), anything else keeps its traceback."""
    import logging
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        entry(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

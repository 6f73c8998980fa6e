"""Writes configs/default.yaml, configs/eval.yaml and configs/generate.yaml from the schema,
with each field's comment.

    python -m settings.generate          # rewrite them
    python -m settings.generate --check  # exit 1 if they differ from the schema (tests do)

The dataclasses in settings/schema.py (and the ModelConfig, DataConfig and OptimConfig they
hold) are the only place a default or its documentation is written; these files show them.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import yaml

from data.config import DataConfig
from settings.schema import TRAINER_DEFAULTS, EvalConfig, EvalData, GenerateConfig, RunConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
COMMENT_COLUMN = 30
HEADERS = {
    "default.yaml": (
        "# Every key of a training run (train.py), with its default and meaning.\n"
        "# GENERATED from settings/schema.py by `python -m settings.generate`: edit the schema.\n"
        "# train.py merges these defaults, then each YAML named on the command line in order,\n"
        "# then key=value overrides; a key not named here is an error. `python train.py ...\n"
        "# --print-config` prints the result. trainer.* goes to lightning.Trainer as is.\n"
    ),
    "eval.yaml": (
        "# Every key of eval.py, with its default and meaning.\n"
        "# GENERATED from settings/schema.py by `python -m settings.generate`: edit the schema.\n"
        "# Same rules as train.py: these defaults, then YAML files, then key=value.\n"
    ),
    "generate.yaml": (
        "# Every key of generate.py, with its default and meaning.\n"
        "# GENERATED from settings/schema.py by `python -m settings.generate`: edit the schema.\n"
        "# Same rules as train.py: these defaults, then YAML files, then key=value.\n"
    ),
}


def field_comments(cls: type) -> dict[str, str]:
    """name -> the comment beside the field in ``cls``'s source."""
    if cls is EvalData:  # made from DataConfig's fields
        return field_comments(DataConfig)
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*?#\s*(.*)$", line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def line(indent: int, key: str, value: str, comment: str | None) -> str:
    text = " " * indent + f"{key}:" + (f" {value}" if value else "")
    if comment:
        text = text.ljust(COMMENT_COLUMN - 2) + f"  # {comment}"
    return text.rstrip()


def render(obj, indent: int = 0) -> list[str]:
    comments = field_comments(type(obj))
    lines = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        comment = comments.get(f.name)
        if is_dataclass(value):
            lines += [line(indent, f.name, "", comment)]
            lines += render(value, indent + 2)
        elif f.name == "trainer":
            lines.append(line(indent, f.name, "", comment))
            lines += [
                line(indent + 2, key, scalar(value[key]), TRAINER_DEFAULTS[key][1]) for key in value
            ]
        else:
            lines.append(line(indent, f.name, scalar(value), comment))
    return lines


def unchecked_defaults(cls: type):
    """An instance of ``cls`` holding its defaults, without its checks (no checkpoint yet)."""
    obj = cls.__new__(cls)
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        setattr(obj, f.name, default)
    return obj


def generated() -> dict[str, str]:
    run = RunConfig()
    evaluation = unchecked_defaults(EvalConfig)
    generation = unchecked_defaults(GenerateConfig)
    return {
        "default.yaml": HEADERS["default.yaml"] + "\n" + "\n".join(render(run)) + "\n",
        "eval.yaml": HEADERS["eval.yaml"] + "\n" + "\n".join(render(evaluation)) + "\n",
        "generate.yaml": HEADERS["generate.yaml"] + "\n" + "\n".join(render(generation)) + "\n",
    }


def main(argv: list[str]) -> int:
    stale = []
    for name, text in generated().items():
        path = CONFIG_DIR / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if "--check" not in argv:
            path.write_text(text)
    if "--check" in argv and stale:
        print(f"stale: {stale}; run python -m settings.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

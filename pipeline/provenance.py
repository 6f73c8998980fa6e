"""Every results file a study or benchmark writes says where it came from.

A number read months later means little without the command that made it, the code it ran
(the commit, and whether the tree had uncommitted changes), the machine and the date. So every
CSV or JSON under runs/ or experiments/results/ is written by :func:`write_results`, which puts
that record inside the file (JSON: a ``"meta"`` key) or beside it (CSV: ``<name>.meta.json``,
since a CSV has nowhere to hold it).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def host() -> dict:
    """The machine: platform, CPU model, core count, torch version."""
    import torch

    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def meta(command: str | None = None) -> dict:
    """The record: command line, git commit and dirty flag (tracked files changed; "unknown"
    and None outside a git checkout), machine, UTC date."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "command": command or shlex.join([Path(sys.executable).name, *sys.argv]),
        "commit": commit or "unknown",
        "dirty": None if status is None else bool(status),
        "machine": host(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(path: str | Path, data, columns: list[str] | None = None,
                  command: str | None = None) -> Path:  # fmt: skip
    """Writes ``data`` to ``path`` with its provenance; returns the path.

    ``.json``: a dict gains a ``"meta"`` key; a list is written as ``{"meta", "rows"}``.
    ``.csv``: ``data`` is a list of dicts (``columns`` in order, default the keys of the first
    row, missing cells empty), and ``<stem>.meta.json`` beside it holds the record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = meta(command)
    if path.suffix == ".json":
        body = (
            {"meta": record, **data} if isinstance(data, dict) else {"meta": record, "rows": data}
        )
        path.write_text(json.dumps(body, indent=1, default=str) + "\n")
    elif path.suffix == ".csv":
        rows = list(data)
        fields = columns or (list(rows[0]) if rows else [])
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        path.with_suffix(".meta.json").write_text(json.dumps(record, indent=1) + "\n")
    else:
        raise ValueError(f"results file {str(path)!r}: suffix {path.suffix!r} is not .json or .csv")
    return path


def rows_of(path: str | Path) -> list:
    """The rows of a JSON results file, written by :func:`write_results` or before it was (a
    bare list)."""
    data = json.loads(Path(path).read_text())
    return data["rows"] if isinstance(data, dict) else data

"""Where documents come from: the running Python's standard library, a directory of text
files, any Hugging Face dataset, or the King James Bible of a Debian package (data/kjv.py).
Every source yields ``{"name": str, "text": str}`` through a ``datasets.IterableDataset``
(streaming), so memory does not grow with the corpus.

``stdlib_code`` (the default, no download): the standard library sources of the running
Python as repository-level documents, like the paper's source-code corpus. Each top-level
module or package is one document: its ``.py`` files in sorted path order, each preceded by a
``# file: <relative path>`` line. The test suite (``test/``) is kept, one document per test
module or test package: it is half of the library's code, realistic long files that import and
exercise the rest, and without it too few documents reach 16K tokens for long-context
evaluation. Excluded: ``site-packages``, and generated or table-only packages
(``encodings``: codec tables; ``pydoc_data``: generated help text; ``lib2to3`` grammar pickles
are not ``.py`` and are skipped anyway).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlparse

import datasets

log = logging.getLogger(__name__)

# recall: data/recall.py; kjv: data/kjv.py
Source = Literal["stdlib_code", "text_dir", "hf", "recall", "kjv"]
SOURCES = get_args(Source)
STDLIB_EXCLUDED = ("site-packages", "encodings", "pydoc_data", "__pycache__")


class DataError(ValueError):
    """The data a run was given cannot be read as asked (a missing directory, a glob that
    matches nothing, a dataset out of reach, a missing text field, an empty corpus, a file that
    is not a tokenizer): the user's input, like a bad config value, so train.py and eval.py
    end with its one-line message and exit status 2 (settings/cli.py), not a traceback."""

    exit_status = 2


# ----------------------------------------------------------------------------------------------
# reading text files robustly


def read_text(path: Path) -> str | None:
    """UTF-8 (with BOM) or, failing that, Latin-1; line endings normalised to ``\\n``.
    Returns None, with a logged warning naming the file, when the file cannot be read."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        log.warning("skipping unreadable file %s: %s", path, err)
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # never fails: every byte is a character
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ----------------------------------------------------------------------------------------------
# stdlib_code


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_units(root: Path, prefix: str = "") -> list[tuple[str, list[Path]]]:
    """(document name, files) for every top-level module or package, and every test module or
    test package under ``test/``; files in sorted path order."""
    units = []
    for entry in sorted(root.iterdir()):
        if entry.name in STDLIB_EXCLUDED or entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".py":
            units.append((prefix + entry.name, [entry]))
        elif entry.is_dir() and entry.name == "test" and not prefix:
            units += stdlib_units(entry, "test/")  # one document per test module / package
        elif entry.is_dir():
            files = sorted(p for p in entry.rglob("*.py") if "__pycache__" not in p.parts)
            if files:
                units.append((prefix + entry.name, files))
    return units


def stdlib_fingerprint(root: Path | None = None) -> str:
    """A content hash of the files that make the corpus: a different Python changes it."""
    root = root or stdlib_root()
    h = hashlib.sha256()
    for _, files in stdlib_units(root):
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _stdlib_documents(units: list[list]) -> Iterator[dict]:
    root = stdlib_root()
    for name, files in units:
        parts = []
        for f in files:
            text = read_text(Path(f))
            if text is not None:
                parts.append(f"# file: {Path(f).relative_to(root)}\n{text}")
        if parts:
            yield {"name": name, "text": "\n".join(parts)}


# ----------------------------------------------------------------------------------------------
# text_dir


def text_files(path: str | os.PathLike, pattern: str) -> list[Path]:
    """The files a text_dir source reads; raises naming the path or the pattern if none."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path={str(path)!r} is not a directory")
    try:
        files = sorted(p for p in root.glob(pattern) if p.is_file())
    except (OSError, ValueError) as err:  # an unreadable directory, a malformed pattern
        raise DataError(f"cannot list data.glob={pattern!r} under data.path={str(root)!r}: "
                        f"{err}") from err  # fmt: skip
    if not files:
        raise DataError(f"data.glob={pattern!r} matches no file under data.path={str(root)!r}")
    return files


def _text_documents(files: list[str], root: str) -> Iterator[dict]:
    for f in files:
        text = read_text(Path(f))
        if text:  # empty files carry no document
            yield {"name": str(Path(f).relative_to(root)), "text": text}


# ----------------------------------------------------------------------------------------------
# hf


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers, without waiting on a hanging connection."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("0", ""):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_documents(name, config, split, text_field) -> Iterator[dict]:
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError, ConnectionError) as err:
        raise DataError(f"data.hf_name={name!r} (config {config!r}, split {split!r}) cannot "
                        f"be loaded: {err}") from err  # fmt: skip
    for i, row in enumerate(ds):
        if text_field not in row:
            raise DataError(
                f"data.hf_text_field={text_field!r} is not a field of {name}: "
                f"fields are {sorted(row)}"
            )
        yield {"name": str(row.get("id", row.get("path", f"{split}/{i}"))), "text": row[text_field]}


# ----------------------------------------------------------------------------------------------
# the one entry point


def documents(cfg) -> tuple[datasets.IterableDataset, str]:
    """A streaming dataset of ``{"name", "text"}`` for ``cfg.source``, and a fingerprint of
    the source's content or identity (for cache keys). Checks its input where it enters."""
    if cfg.source == "stdlib_code":
        return _stdlib_source()
    if cfg.source == "text_dir":
        return _text_dir_source(cfg)
    if cfg.source == "hf":
        return _hf_source(cfg)
    if cfg.source == "kjv":
        from data.kjv import kjv_source

        return kjv_source()
    raise ValueError(f"data.source={cfg.source!r} is not one of {SOURCES}")


def _stdlib_source() -> tuple[datasets.IterableDataset, str]:
    units = [(name, [str(f) for f in files]) for name, files in stdlib_units(stdlib_root())]
    gen = datasets.IterableDataset.from_generator(_stdlib_documents, gen_kwargs={"units": units})
    return gen, f"stdlib-{stdlib_fingerprint()}"


def _text_dir_source(cfg) -> tuple[datasets.IterableDataset, str]:
    """The files' paths, sizes and modification times make the fingerprint (hashing every
    file's content would read the whole corpus on every run)."""
    files = text_files(cfg.path, cfg.glob)
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    gen = datasets.IterableDataset.from_generator(
        _text_documents,
        gen_kwargs={"files": [str(f) for f in files], "root": str(Path(cfg.path))},
    )
    return gen, f"dir-{h.hexdigest()[:16]}"


def _hf_source(cfg) -> tuple[datasets.IterableDataset, str]:
    """Fails now, naming the setting, if there is no dataset name or no hub to ask; the
    dataset's identity (name, config, split, field) makes the fingerprint."""
    if not cfg.hf_name:
        raise DataError("data.source='hf' needs data.hf_name (a Hugging Face dataset name)")
    if not hub_reachable():
        raise DataError(
            f"data.source='hf' ({cfg.hf_name}) needs the Hugging Face hub, which is not "
            "reachable (offline, HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1). Use "
            "data.source=stdlib_code or data.source=text_dir data.path=DIR"
        )
    gen = datasets.IterableDataset.from_generator(
        _hf_documents,
        gen_kwargs={
            "name": cfg.hf_name,
            "config": cfg.hf_config,
            "split": cfg.hf_split,
            "text_field": cfg.hf_text_field,
        },
    )
    key = f"{cfg.hf_name}:{cfg.hf_config}:{cfg.hf_split}:{cfg.hf_text_field}"
    return gen, "hf-" + hashlib.sha256(key.encode()).hexdigest()[:16]

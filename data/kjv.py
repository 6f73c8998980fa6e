"""``data.source=kjv``: the King James Bible as 66 documents, one per book: English prose that no
model here was trained on (they all read Python's standard library), for scoring text out of
their domain in bits per byte.

Where it comes from: Debian's ``bible-kjv-text`` (the text, compressed in the Bible Retrieval
System's own format at ``/usr/lib/bible.data``) and ``bible-kjv`` (``bible``, its reader, the
only program that decodes that format); ``apt-get install -y bible-kjv`` brings both. License:
the 1611 translation's copyright has expired (the package's copyright file says so; public
domain), and the reader is GPL-2+; only the text is read here, through the reader's output.

What a document holds: the reader's formatted output for the book, one line per chapter heading
(``Genesis 1``) and one per verse (``1 In the beginning God created ...``), chapters separated by
a blank line, leading spaces stripped. A book's name is its document name.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess

import datasets

from data.sources import DataError

READER = "bible"  # Debian's bible-kjv; tests point it at a path that does not exist
WHOLE = "Gen1:1-Rev22:21"  # every verse, in canonical order
INSTALL = "apt-get install -y bible-kjv (Debian; it brings the text, bible-kjv-text)"
HEADING = re.compile(r"^(?P<book>(?:[1-3] )?[A-Z][A-Za-z ]*?) (?P<chapter>\d+)$")


def read_bible(reader: str | None = None) -> str:
    """The reader's text of every verse; a DataError saying how to install it when the
    reader or its data is missing."""
    reader = reader or READER
    found = shutil.which(reader)
    if found is None:
        raise DataError(f"data.source='kjv' needs the reader {reader!r}, not found: {INSTALL}")
    # a line width no verse reaches: one line per verse
    run = subprocess.run([found, "-l", "100000", WHOLE], capture_output=True, text=True)
    if run.returncode != 0 or not run.stdout.strip():
        why = (run.stderr or run.stdout).strip().splitlines()[:1] or [f"exit {run.returncode}"]
        raise DataError(f"data.source='kjv': {reader} cannot read the text ({why[0]}): {INSTALL}")
    return run.stdout


def books(text: str) -> list[tuple[str, str]]:
    """(book name, its text) in order, split at each book's first chapter heading."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        head = HEADING.match(line)
        if head and (not out or out[-1][0] != head["book"]):
            out.append((head["book"], []))
        if out:
            out[-1][1].append(line.strip())
    return [(name, "\n".join(lines).strip() + "\n") for name, lines in out]


def _documents(text: str):
    for name, body in books(text):
        yield {"name": name, "text": body}


def kjv_source() -> tuple[datasets.IterableDataset, str]:
    """The books as a streaming dataset, fingerprinted by the text's hash (4 MB, read once)."""
    text = read_bible()
    gen = datasets.IterableDataset.from_generator(_documents, gen_kwargs={"text": text})
    return gen, "kjv-" + hashlib.sha256(text.encode()).hexdigest()[:16]

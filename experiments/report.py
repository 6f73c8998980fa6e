"""Writes every results table of README.md and experiments/README.md from the committed files.

    python -m experiments.report          # rewrite the tables between their markers (make report)
    python -m experiments.report --check  # exit 1 and a diff where a document differs (tests do)

A table lives between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in its document;
the text between the markers is what ``TABLES[NAME]`` gives from the files under
experiments/results/ (each written with its provenance by pipeline/provenance.py), followed
by a line naming the file and the command that writes it. The prose around the markers is
written by hand; the numbers inside them only come from files, as configs/default.yaml only
comes from the schema (settings/generate.py).
"""

from __future__ import annotations

import csv
import difflib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
K = 1024


class ReportError(ValueError):
    """A document's markers are missing, unbalanced or unknown (the message names the marker)."""


@dataclass(frozen=True)
class Table:
    document: str  # relative to the repository root
    make: Callable[[Path], str]  # results_dir -> markdown


TABLES: dict[str, Table] = {}


def table(name: str, document: str = "experiments/README.md"):
    """Registers ``fn(results_dir) -> markdown`` as the table between ``name``'s markers."""

    def register(fn):
        TABLES[name] = Table(document, fn)
        return fn

    return register


# -- reading results files ------------------------------------------------------------------------


def _number(text: str):
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV, numbers parsed, empty cells None."""
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_json_rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data


def md_tables(path: Path) -> list[str]:
    """The markdown tables of a file (a study's table.md), in order."""
    tables, current = [], []
    for line in path.read_text().splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    return tables


def study_table(results_dir: Path, file: str, command: str, index: int = 0, note=None) -> str:
    """A study's table.md: its caption (what was trained and measured, and when), its
    ``index``-th table, and the source line."""
    paragraphs = [p.strip() for p in (results_dir / file).read_text().split("\n\n")]
    caption = next(p for p in paragraphs if p and not p.startswith(("#", "|")))
    table_text = md_tables(results_dir / file)[index]
    return f"{caption}\n\n{table_text}\n\n{source(results_dir, [file], command, note)}"


def provenance(path: Path) -> dict | None:
    """The record pipeline/provenance.py wrote with a file (CSV: ``<stem>.meta.json``
    beside it; JSON: its ``"meta"`` key), or None for a file written before it existed."""
    if path.suffix == ".csv":
        meta_path = path.with_suffix(".meta.json")
        return json.loads(meta_path.read_text()) if meta_path.exists() else None
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data.get("meta") if isinstance(data, dict) else None
    return None


def source(results_dir: Path, files: list[str], command: str, note: str | None = None) -> str:
    """The line under a table: its files, the command that writes them, and their record."""
    names = ", ".join(f"`experiments/results/{f}`" for f in files)
    line = f"From {names}; written by `{command}`."
    metas = [provenance(results_dir / f) for f in files]
    if any("*" in f for f in files):
        pass  # many files: the note says which carry a record
    elif all(m is not None for m in metas):
        m = metas[0]
        line += (
            f" Recorded in the file: `{m['command']}` at commit {m['commit'][:10]}"
            f"{' (uncommitted changes)' if m.get('dirty') else ''}, {m['machine']['cpu']}, "
            f"{m['date'][:10]}."
        )
    else:
        line += " The file holds no provenance record (no commit or machine inside)."
    if note:
        line += f" *{note[0].upper()}{note[1:]}.*"
    return line


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def short(n: int) -> str:
    return f"{n // (K * K)}M" if n >= K * K and n % (K * K) == 0 else f"{n // K}K"


# -- the tables ---------------------------------------------------------------------------------


@table("table2_tiny")
def table2_tiny(results_dir: Path) -> str:
    return study_table(
        results_dir,
        "paper_table2_tiny/table.md",
        "python -m experiments.studies.paper_table2 --scale tiny",
    )


@table("table2_tiny_seed2")
def table2_tiny_seed2(results_dir: Path) -> str:
    command = ("python -m experiments.studies.paper_table2 --scale tiny --only "
               "sparse_transformer_2048 longnet_2048 --set seed=2 data.seed=2 "
               "--out runs/paper_table2_tiny_seed2")  # fmt: skip
    return study_table(results_dir, "paper_table2_tiny/table_seed2.md", command)


@table("table2_paper")
def table2_paper(results_dir: Path) -> str:
    """The paper's numbers: a fact from elsewhere, transcribed in the study YAML."""
    path = "configs/study/paper_table2_tiny.yaml"
    paper = yaml.safe_load((ROOT / path).read_text())["paper"]
    header = ["model", "training length", "batch", *[f"ppl @{short(n)}" for n in paper["lengths"]]]
    rows = [[name, short(n), batch, *[f"{p:.2f}" for p in ppl]]
            for name, n, batch, *ppl in paper["rows"]]  # fmt: skip
    return markdown(header, rows) + (
        f"\n\nNot measured here: the paper's Table 2 (arXiv 2307.02486), as transcribed under "
        f"`paper:` in `{path}`; check it against the paper before quoting it."
    )


@table("ablate_tiny")
def ablate_tiny(results_dir: Path) -> str:
    return study_table(results_dir, "ablate_dilation_tiny/table.md",
                       "python -m experiments.studies.ablate_dilation "
                       "--config configs/study/ablate_dilation_tiny.yaml")  # fmt: skip


ABLATE_RECIPE = (
    "make ablate (configs/study/ablate_dilation_recipe.yaml: two shards, then the table)"
)


@table("ablate_recipe")
def ablate_recipe(results_dir: Path) -> str:
    return study_table(results_dir, "ablate_dilation_recipe/table.md", ABLATE_RECIPE)


@table("ablate_recipe_span")
def ablate_recipe_span(results_dir: Path) -> str:
    """The repeated-span probe of each schedule (each run's eval.py repeated_span.csv)."""
    d = "ablate_dilation_recipe"
    runs = json.loads((results_dir / d / "results.json").read_text())["runs"]
    rows, distances = [], None
    for run in runs:
        span = {
            r["distance"]: r["drop"]
            for r in read_csv(results_dir / d / "spans" / f"{run['name']}.csv")
        }
        distances = distances or sorted(span)
        rows.append([run["name"], run["w"], run["r"], *(f"{span[k]:.2f}" for k in distances)])
    header = ["schedule", "w", "r", *(f"drop d={k}" for k in distances)]
    note = "each run's runs/ablate_dilation_recipe/<name>/eval/repeated_span.csv, copied"
    return (
        markdown(header, rows)
        + "\n\n"
        + source(results_dir, [f"{d}/spans/*.csv"], ABLATE_RECIPE, note)
    )


@table("throughput")
def throughput(results_dir: Path) -> str:
    f = "throughput/throughput.csv"
    rows = [r for r in read_csv(results_dir / f) if r["status"] == "ok"]
    by = {(r["attention"], r["n"]): r for r in rows}
    out = []
    for n in sorted({r["n"] for r in rows}):
        tok = {a: by[(a, n)]["tokens_per_s"] if (a, n) in by else None
               for a in ("dilated", "dense", "sparse")}  # fmt: skip
        peaks = [by[(a, n)]["peak_mib"] for a in ("dilated", "dense", "sparse") if (a, n) in by]
        ratio = tok["dilated"] / tok["dense"] if tok["dilated"] and tok["dense"] else None
        out.append([short(n), *["-" if t is None else f"{t:.0f}" for t in tok.values()],
                    "-" if ratio is None else f"{ratio:.2f}",
                    f"{min(peaks):.0f}-{max(peaks):.0f}"])  # fmt: skip
    header = ["N", "LongNet tok/s", "dense tok/s", "Sparse Tr. tok/s", "LongNet / dense",
              "peak MiB (all three)"]  # fmt: skip
    return (
        markdown(header, out)
        + "\n\n"
        + source(results_dir, [f], "python -m experiments.bench.throughput")
    )


def _context_parallel_rows(results_dir: Path, files: list[str]) -> list[dict]:
    rows = []
    for f in files:
        for r in read_csv(results_dir / f):
            r.setdefault("status", "ok")  # the earliest files have no status column
            r["status"] = r["status"] or "ok"
            rows.append(r)
    return rows


def _context_parallel(results_dir, files, schedule, command, note=None) -> str:
    from experiments.bench.context_parallel import table as cp_table

    rows = _context_parallel_rows(results_dir, files)
    return cp_table(rows, schedule) + "\n\n" + source(results_dir, files, command, note)


@table("context_parallel")
def context_parallel(results_dir: Path) -> str:
    return _context_parallel(results_dir, ["context_parallel/context_parallel.csv"], "paper",
                             "make context-parallel")  # fmt: skip


@table("context_parallel_extended")
def context_parallel_extended(results_dir: Path) -> str:
    return _context_parallel(
        results_dir, ["context_parallel/context_parallel_extended.csv"], "extended",
        "python -m experiments.bench.context_parallel --schedule extended")  # fmt: skip


@table("context_parallel_longest")
def context_parallel_longest(results_dir: Path) -> str:
    command = ("python -m experiments.bench.context_parallel --worlds 1 4 --sizes 524288 786432 "
               "--repeats 1 --max-backward 786432 --name context_parallel_longest")  # fmt: skip
    return _context_parallel(results_dir, ["context_parallel/context_parallel_longest.csv"],
                             "paper", command)  # fmt: skip


@table("context_parallel_balance_pairs")
def context_parallel_balance_pairs(results_dir: Path) -> str:
    from experiments.bench.context_parallel_balance import pairs_table

    f = "context_parallel/balance_pairs.csv"
    command = "python -m experiments.bench.context_parallel_balance --pairs-only"
    return pairs_table(read_csv(results_dir / f)) + "\n\n" + source(results_dir, [f], command)


@table("attention_scaling")
def attention_scaling(results_dir: Path) -> str:
    """`make bench`: dilated attention against its kernel floor and dense SDPA, by N."""
    from experiments.bench.attention_scaling import summary
    from experiments.bench.attention_scaling import table as bench_table

    f, command = "attention_scaling/attention_scaling.csv", "make bench"
    if not (results_dir / f).exists():
        return f"Not measured yet: `{command}` writes `experiments/results/{f}`."
    rows = read_csv(results_dir / f)
    return f"{bench_table(rows)}\n\n{summary(rows)}.\n\n{source(results_dir, [f], command)}"


@table("context_parallel_balance_timing")
def context_parallel_balance_timing(results_dir: Path) -> str:
    from experiments.bench.context_parallel_balance import timing_table

    f, command = "context_parallel/balance_timing.csv", "make context-parallel-balance"
    if not (results_dir / f).exists():
        return f"Not measured yet: `{command}` writes `experiments/results/{f}`."
    return timing_table(read_csv(results_dir / f)) + "\n\n" + source(results_dir, [f], command)


@table("context_parallel_projection")
def context_parallel_projection(results_dir: Path) -> str:
    from experiments.bench.context_parallel import projection

    return projection() + (
        "\n\nA formula, not a measurement: `projection()` in "
        "`experiments/bench/context_parallel.py` (printed by `make context-parallel`)."
    )


LONGSEQ = "python -m experiments.bench.long_sequence"


@table("longseq")
def longseq(results_dir: Path) -> str:
    f = "long_sequence/longseq.json"
    out = []
    for r in read_json_rows(results_dir / f):
        if r["status"] == "skipped":  # a shorter N was not reached in this mode
            continue
        if r["status"] != "ok":
            out.append([short(r["n"]), r["mode"], r["status"], "", "", ""])
            continue
        out.append([short(r["n"]), r["mode"], f"{r['step_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                    f"{r['peak_mib']:.0f}", f"{r['mib_per_token']:.3f}"])  # fmt: skip
    header = ["N", "mode", "step s", "tokens/s", "peak MiB", "MiB/token"]
    return markdown(header, out) + "\n\n" + source(results_dir, [f], LONGSEQ)


@table("longseq_timing")
def longseq_timing(results_dir: Path) -> str:
    f = "long_sequence/longseq_timing.json"
    rows = read_json_rows(results_dir / f)
    step = {(r["n"], r["mode"]): r["step_s"] for r in rows if r["status"] == "ok"}
    out = []
    for n in sorted({n for n, _ in step}):
        base = step.get((n, "chunked"))
        cells = [short(n), "-" if base is None else f"{base:.1f}"]
        for mode in ("saving", "sublayer"):
            s = step.get((n, mode))
            cells.append("-" if s is None else
                         f"{s:.1f}" + ("" if base is None else f" ({s / base:.2f}x)"))  # fmt: skip
        out.append(cells)
    header = ["N", "chunked s", "saving s (ratio)", "sublayer s (ratio)"]
    return (
        markdown(header, out)
        + "\n\n"
        + source(
            results_dir, [f], f"{LONGSEQ} --lengths 32768 131072 --modes chunked saving sublayer"
        )
    )


@table("longseq_estimate")
def longseq_estimate(results_dir: Path) -> str:
    from experiments.bench.long_sequence import estimate

    f = "long_sequence/longseq.json"
    text = estimate(read_json_rows(results_dir / f), "longnet_tiny",
                    ["longnet_base", "longnet_2_7b"], 141e9, 8192)  # fmt: skip
    return text + (
        f"\n\nAn estimate, not a measurement: `estimate()` in "
        f"`experiments/bench/long_sequence.py` from `experiments/results/{f}` "
        f"(`{LONGSEQ} --estimate-only --out experiments/results/long_sequence`)."
    )


LONG_RANGE = "python -m experiments.studies.long_range"


@table("long_range")
def long_range(results_dir: Path) -> str:
    return study_table(results_dir, "long_range_tiny/table.md", LONG_RANGE)


@table("long_range_by_length")
def long_range_by_length(results_dir: Path) -> str:
    """Accuracy per run, evaluation length and distance, from recall.csv."""
    f = "long_range_tiny/recall.csv"
    rows = read_csv(results_dir / f)
    runs = list(dict.fromkeys(r["run"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    cells = {(r["run"], r["length"], r["distance"]): r["accuracy"] for r in rows}
    columns = [(L, d) for L in lengths for d in sorted({r["distance"] for r in rows
                                                         if r["length"] == L})]  # fmt: skip
    header = ["run"] + [f"L={L}: d={d}" if i == 0 or columns[i - 1][0] != L else str(d)
                        for i, (L, d) in enumerate(columns)]  # fmt: skip
    out = [[run] + [f"{cells[(run, L, d)]:.2f}" if (run, L, d) in cells else ""
                    for L, d in columns] for run in runs]  # fmt: skip
    note = (
        "assembled from the runs' eval/recall.csv by a step that is not in the repository "
        "(its columns are not what pipeline/recall_probe.py writes); to be re-measured"
    )
    return markdown(header, out) + "\n\n" + source(results_dir, [f], LONG_RANGE, note)


COPYING = "python -m experiments.tools.calibrate_copying NAME ..."
CALIBRATION_RUNS = ["A_randrep", "B_natrep", "C_a64", "D_a512", "E_longnet", "F_paperarch",
                    "F2_paperarch_torch", "F3_paperarch_magneto_untied",
                    "F4_paperarch_magneto_embed1", "G_nostage",
                    "H_D2dilated", "P1_dense_a64_s2", "P2_dil8h_a64", "P3_dense8h_a64",
                    "Q1_dense_t4096_a64", "Q2_dense_t4096_a512"]  # fmt: skip


def _calibration_rows(path: Path) -> list[dict]:
    """The evaluation lines of a calibration log (the exploratory loop's keys or the tool's)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step")]


@table("copying_calibration")
def copying_calibration(results_dir: Path) -> str:
    """Per calibration run: where its training loss on the mixed batch stood at the end of the
    short stage, and the last evaluation (gain at 512 over 64, span drops)."""
    files, out = [], []
    for name in CALIBRATION_RUNS:
        f = f"copying_calibration/{name}.jsonl"
        if not (results_dir / f).exists():
            continue
        files.append(f)
        rows = _calibration_rows(results_dir / f)
        short_rows = [r for r in rows if r.get("seq_len", r.get("L")) < 512]
        last = rows[-1]
        span = last.get("span_drop", last.get("span"))
        out.append([
            name, last["step"], f"{last['tokens'] / 1e6:.1f}M",
            f"{short_rows[-1]['loss']:.2f} @ {short_rows[-1]['step']}" if short_rows else "-",
            last.get("seq_len", last.get("L")), f"{last['ppl512']:.1f}", f"{last['ppl64']:.1f}",
            f"{100 * last.get('gain', last.get('ratio')):.0f}%",
            *(f"{span[str(d)]:.2f}" for d in (32, 64, 128, 256)),
        ])  # fmt: skip
    header = ["run", "step", "tokens", "short-stage loss @ step", "last len", "ppl@512",
              "ppl@64", "gain", "drop d=32", "64", "128", "256"]  # fmt: skip
    return markdown(header, out) + "\n\n" + source(
        results_dir, ["copying_calibration/*.jsonl"], COPYING,
        "the A-H files were written by copying_calibration/exploratory_loop.py, the loop the "
        "tool was cleaned from, and their first line holds its arguments; the F2-F4, P and Q "
        "files' first line holds the tool's arguments and provenance record (command, commit, "
        "machine, date)",
    )  # fmt: skip


@table("copying_trainpy")
def copying_trainpy(results_dir: Path) -> str:
    """The recipe through train.py and eval.py: perplexity by context and the span probe, for
    each second stage run from the same first stage."""
    d = "copying_calibration/trainpy_recipe"
    out, files = [], []
    for name in ("dense", "dilated"):
        ppl_file, span_file = f"{d}/{name}_ppl_vs_context.csv", f"{d}/{name}_repeated_span.csv"
        if not (results_dir / ppl_file).exists():
            continue
        files += [ppl_file, span_file]
        ppl = {r["context_length"]: r["ppl"] for r in read_csv(results_dir / ppl_file)}
        span = {r["distance"]: r["drop"] for r in read_csv(results_dir / span_file)}
        model = read_csv(results_dir / ppl_file)[0]["model"].split(" [", 1)[1].rstrip("]")
        out.append([name, model, *(f"{ppl[n]:.2f}" for n in sorted(ppl)),
                    f"{100 * (1 - ppl[max(ppl)] / ppl[min(ppl)]):.0f}%",
                    *(f"{span[k]:.2f}" for k in sorted(span))])  # fmt: skip
    lengths = sorted(r["context_length"] for r in read_csv(results_dir / files[0]))
    distances = sorted(r["distance"] for r in read_csv(results_dir / files[1]))
    header = ["second stage", "model", *(f"ppl@{n}" for n in lengths),
              f"{lengths[-1]} vs {lengths[0]}", *(f"drop d={k}" for k in distances)]  # fmt: skip
    command = f"bash experiments/results/{d}/commands.sh (train.py twice, eval.py)"
    return markdown(header, out) + "\n\n" + source(results_dir, files, command)


DEMO_CALIBRATION = [
    "A64_w64",
    "A64_w256",
    "A64_dense",
    "A512_w64",
    "A512_w256",
    "A512_w256_s300_c25",
]


@table("demo_calibration")
def demo_calibration(results_dir: Path) -> str:
    """The second stages tried for `make demo`: perplexity by context and the span probe."""
    d, out, files = "demo/calibration", [], []
    for name in DEMO_CALIBRATION:
        ppl_file, span_file = f"{d}/{name}_ppl_vs_context.json", f"{d}/{name}_repeated_span.csv"
        rows = read_json_rows(results_dir / ppl_file)
        ppl = {r["context_length"]: r["ppl"] for r in rows}
        span = {r["distance"]: r["drop"] for r in read_csv(results_dir / span_file)}
        files += [ppl_file, span_file]
        out.append([name, *(f"{ppl[n]:.2f}" for n in sorted(ppl)),
                    f"{100 * (1 - ppl[512] / ppl[64]):.0f}%",
                    *(f"{span[k]:.2f}" for k in (32, 33, 64, 65, 128, 129, 256, 257))])  # fmt: skip
    lengths = sorted(r["context_length"] for r in read_json_rows(results_dir / files[0]))
    header = ["run", *(f"ppl@{n}" for n in lengths), "512 vs 64",
              *(f"drop d={k}" for k in (32, 33, 64, 65, 128, 129, 256, 257))]  # fmt: skip
    note = "runs and commands: experiments/results/demo/calibration/README.md"
    return (
        markdown(header, out)
        + "\n\n"
        + source(
            results_dir,
            [f"{d}/*"],
            "train.py twice, then eval.py configs/experiment/demo_eval.yaml",
            note,
        )
    )


TABLE2_NAMES = {
    "transformer": "Transformer",
    "sparse_transformer": "Sparse Transformer",
    "longnet": "LongNet",
}
TABLE2_RECIPE = (
    "python -m experiments.studies.paper_table2 (make table2: two shards, then the table)"
)


def _table2_runs(results_dir: Path) -> list[dict]:
    return json.loads((results_dir / "paper_table2_recipe/results.json").read_text())["runs"]


@table("table2_recipe")
def table2_recipe(results_dir: Path) -> str:
    return study_table(results_dir, "paper_table2_recipe/table.md", TABLE2_RECIPE)


@table("figure7b_recipe")
def figure7b_recipe(results_dir: Path) -> str:
    """The paper's Figure 7b: the mean NLL of the same final tokens given a growing prompt,
    per run (eval.py's prompting curve, at the longest evaluation length)."""
    f = "paper_table2_recipe/results.json"
    runs = _table2_runs(results_dir)
    prompts = sorted({int(p) for r in runs for p in r.get("prompting", {})})
    rows = [[TABLE2_NAMES[r["model"]], r["seq_len"],
             *(f"{r['prompting'][str(p)]:.3f}" if str(p) in r.get("prompting", {}) else "-"
               for p in prompts)] for r in runs]  # fmt: skip
    header = ["model", "training length", *(f"prompt {p}" for p in prompts)]
    return markdown(header, rows) + "\n\n" + source(results_dir, [f], TABLE2_RECIPE)


@table("figure6_recipe")
def figure6_recipe(results_dir: Path) -> str:
    """The paper's Figure 6 question from the same runs: the same model trained at growing
    lengths on the same tokens, perplexity at its own length and at every evaluation length,
    and the attention FLOPs it spent training."""
    f = "paper_table2_recipe/results.json"
    runs = [r for r in _table2_runs(results_dir) if r["model"] != "sparse_transformer"]
    runs.sort(key=lambda r: (r["model"], r["seq_len"]))
    lengths = sorted({int(n) for r in runs for n in r["eval"]})
    rows = []
    for r in runs:
        ppl = {int(n): v for n, v in r["eval"].items()}
        rows.append([TABLE2_NAMES[r["model"]], r["seq_len"], _cell(ppl.get(r["seq_len"])),
                     *(_cell(ppl.get(n)) for n in lengths),
                     _cell(r.get("attn_tflop")), f"{r['train']['train_seconds']:.0f}"])  # fmt: skip
    header = [
        "model",
        "training length",
        "ppl at its own length",
        *(f"ppl @{n}" for n in lengths),
        "attention TFLOP (training)",
        "train s",
    ]
    return markdown(header, rows) + "\n\n" + source(results_dir, [f], TABLE2_RECIPE)


def _cell(x) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) and x == x else "-"


@table("demo")
def demo(results_dir: Path) -> str:
    """What `make demo` measured: its training time, perplexity by context, the span probe."""
    d = "demo"
    files = [f"{d}/ppl_vs_context.json", f"{d}/repeated_span.csv", f"{d}/timing.json"]
    ppl = {r["context_length"]: r["ppl"] for r in read_json_rows(results_dir / files[0])}
    span = {r["distance"]: r["drop"] for r in read_csv(results_dir / files[1])}
    t = json.loads((results_dir / files[2]).read_text())
    lines = [
        f"Training: first stage {t['stage']['steps']} steps in {t['stage']['train_seconds']} s, "
        f"second {t['main']['steps']} steps in {t['main']['train_seconds']} s (validation "
        f"perplexity {t['main']['val_ppl_end']}); `make demo` {t['make_demo_wall_seconds']:.0f} s "
        "wall with eval.py.",
        "",
        markdown(["context (tokens)", *map(str, sorted(ppl))],
                 [["perplexity", *(f"{ppl[n]:.2f}" for n in sorted(ppl))]]),
        "",
        markdown(["copy distance d", *map(str, sorted(span))],
                 [["NLL drop (nats/token)", *(f"{span[k]:.2f}" for k in sorted(span))]]),
    ]  # fmt: skip
    note = "also runs/demo/eval/repeated_span.csv, copied as experiments/results/demo/"
    return "\n".join(lines) + "\n\n" + source(results_dir, [files[0], files[2]], "make demo", note)


@table("decode")
def decode(results_dir: Path) -> str:
    """Decoding cost against context (experiments/bench/decode.py)."""
    f = "decode/decode.csv"
    rows = read_csv(results_dir / f)
    cell = lambda r, k, spec: "-" if r.get(k) is None else format(r[k], spec)  # noqa: E731
    out = [[r["model"], short(r["context"]), cell(r, "prefill_s", ".2f"),
            cell(r, "decode_tok_s", ".0f"), cell(r, "cache_mib", ".2f"),
            (r.get("note") or "")[:70]] for r in rows]  # fmt: skip
    header = ["model", "context", "prefill s", "decode tokens/s", "cache MiB", "note"]
    return markdown(header, out) + "\n\n" + source(results_dir, [f], "make decode")


@table("documents")
def documents(results_dir: Path) -> str:
    """Document masks' cost (experiments/bench/documents.py) and the study
    (experiments/studies/document_mask.py), each once its file exists."""
    parts = []
    bench, study = "documents/documents.csv", "document_mask_recipe/table.md"
    if (results_dir / bench).exists():
        rows = read_csv(results_dir / bench)
        out = [[short(r["n"]), r["attention"], f"{r['documents']} ({r['median_doc']})",
                f"{r['unmasked_s']:.2f}", f"{r['masked_s']:.2f}", f"{r['ratio']:.2f}",
                f"{r['unmasked_mem'] / 2**20:.0f}", f"{r['masked_mem'] / 2**20:.0f}"]
               for r in rows]  # fmt: skip
        header = ["N", "attention", "documents (median tokens)", "unmasked fwd+bwd s",
                  "masked fwd+bwd s", "masked / unmasked", "peak MiB unmasked",
                  "peak MiB masked"]  # fmt: skip
        parts.append(markdown(header, out) + "\n\n" + source(results_dir, [bench],
                                                              "make bench-documents"))  # fmt: skip
    else:
        parts.append("Not yet measured: `make bench-documents` writes "
                     "`experiments/results/documents/documents.csv`.")  # fmt: skip
    if (results_dir / study).exists():
        parts.append(study_table(results_dir, study, "make documents"))
    else:
        parts.append("Not yet run: `make documents` writes runs/document_mask_recipe/table.md, "
                     "to be copied to `experiments/results/document_mask_recipe/`.")  # fmt: skip
    return "\n\n".join(parts)


@table("bpb")
def bpb(results_dir: Path) -> str:
    """Bits per byte against context, per model and window method, on each corpus
    (experiments/studies/bpb.py)."""
    f = "bpb/bpb.csv"
    if not (results_dir / f).exists():
        return "Not yet measured: `make bpb` writes `experiments/results/bpb/bpb.csv`."
    rows = read_csv(results_dir / f)
    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    lengths = sorted({r["context"] for r in rows})
    value = {(r["corpus"], r["model"], r["method"], r["context"]): r["bpb"] for r in rows}
    out, methods = [], list(dict.fromkeys(r["method"] for r in rows))
    pairs = [(m, w) for m in dict.fromkeys(r["model"] for r in rows) for w in methods]
    for model, method in pairs:
        r0 = next(r for r in rows if r["model"] == model)
        out.append([r0["label"], r0["train_len"], method,
                    *(_cell3(value.get((c, model, method, n))) for c in corpora
                      for n in lengths)])  # fmt: skip
    names = {"stdlib": "stdlib", "kjv": "KJV"}
    header = ["model", "trained at", "window", *(f"{names.get(c, c)} @{n}" for c in corpora
                                                  for n in lengths)]  # fmt: skip
    docs = {c: next(r["documents"] for r in rows if r["corpus"] == c) for c in corpora}
    note = "documents per corpus: " + ", ".join(f"{names.get(c, c)} {docs[c]}" for c in corpora)
    return markdown(header, out) + "\n\n" + source(results_dir, [f], "make bpb", note)


def _cell3(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) and x == x else "-"


def _md_rows(path: Path, index: int = 0) -> list[dict]:
    """The rows of a study's ``index``-th markdown table, by column name, numbers parsed."""
    header, _, *lines = md_tables(path)[index].splitlines()
    names = [c.strip() for c in header.strip("|").split("|")]
    cells = [[_number(c.strip()) for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(names, row, strict=True)) for row in cells]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"


@table("studies")
def studies(results_dir: Path) -> str:
    """Every study and benchmark with its command, config and the time its results file
    records (training and evaluation seconds; no file records a benchmark's wall time)."""
    t = json.loads((results_dir / "demo/timing.json").read_text())
    demo_time = (f"{t['stage']['train_seconds'] + t['main']['train_seconds']} s of training, "
                 f"{_minutes(t['make_demo_wall_seconds'])} wall with eval.py "
                 "(`demo/timing.json`)")  # fmt: skip
    stage = json.loads((results_dir / "paper_table2_recipe/stage_done.json").read_text())
    runs = [r["train"]["train_seconds"] for r in _table2_runs(results_dir)]
    recipe_time = (f"training: the shared stage {_minutes(stage['train_seconds'])}, then "
                   f"{min(runs) / 60:.0f}-{_minutes(max(runs))} per run (the shortest a resumed "
                   "part), on cores shared with up to five other processes "
                   "(`paper_table2_recipe/results.json`, `stage_done.json`)")  # fmt: skip
    tiny = _md_rows(results_dir / "paper_table2_tiny/table.md")
    tiny_time = (f"{_minutes(sum(r['train s'] for r in tiny))} of training, "
                 f"{_minutes(sum(r['eval s'] for r in tiny))} of eval.py "
                 "(`paper_table2_tiny/table.md`)")  # fmt: skip

    def trained(file: str) -> str:
        took = re.search(r"Training took (\d+) s in all", (results_dir / file).read_text())
        return f"{_minutes(int(took.group(1)))} of training, all runs (`{file}`)"

    none = "not recorded in its file"
    rows = [
        ["`make demo`", "the copying recipe on a tiny LongNet, eval.py from 64 to 2048 tokens",
         "`configs/experiment/demo*.yaml`", demo_time, "minutes"],
        ["`make table2`", "the paper's Table 2 protocol with the copying recipe (two one-thread "
         "processes)", "`configs/study/paper_table2_recipe.yaml`", recipe_time, "minutes"],
        ["`python -m experiments.studies.paper_table2 --scale tiny`", "the first run, 4 x 256 "
         "models without the recipe", "`configs/study/paper_table2_tiny.yaml`", tiny_time,
         "minutes"],
        ["`python -m experiments.studies.paper_table2 --scale paper`", "Table 2 at the paper's "
         "scale", "`configs/study/paper_table2_paper.yaml`", "not feasible",
         "~4 weeks (section 1)"],
        ["`make ablate`", "dilation-schedule ablation with the copying recipe (two processes)",
         "`configs/study/ablate_dilation_recipe.yaml`", "not yet run", "minutes"],
        ["`python -m experiments.studies.ablate_dilation --config "
         "configs/study/ablate_dilation_tiny.yaml`", "the first ablation, without the recipe",
         "`configs/study/ablate_dilation_tiny.yaml`",
         trained("ablate_dilation_tiny/table.md"), "minutes"],
        ["`make longrange`", "which attention recalls far: recall accuracy by distance (two "
         "one-thread processes)", "`configs/study/long_range_tiny.yaml`",
         trained("long_range_tiny/table.md"), "minutes"],
        ["`make bpb`", "bits per byte against context of the demo and Table 2 models on code and "
         "prose, two window methods", "arguments of `experiments/studies/bpb.py`", none,
         "minutes"],
        ["`make throughput`", "training tokens/s and memory, 2K-32K",
         "arguments of `experiments/bench/throughput.py`", none, "minutes"],
        ["`make bench`", "dilated attention alone vs its kernel floor and dense",
         "arguments of `experiments/bench/attention_scaling.py`", none, "section 0 below"],
        ["`make context-parallel`", "dilated attention with the sequence split across 1, 2, 4 "
         "processes", "arguments of `experiments/bench/context_parallel.py`", none,
         "section 4 below"],
        ["`make long-sequence`", "one training step at 32K-1M tokens, with and without the "
         "memory savers", "arguments of `experiments/bench/long_sequence.py`", none,
         "section 5 below"],
    ]  # fmt: skip
    header = ["command", "study", "config", "time on this CPU, from its file",
              "on one GPU (estimate)"]  # fmt: skip
    return markdown(header, rows) + (
        "\n\nThe times are what the file named in each cell, under `experiments/results/`, records "
        "(training and evaluation seconds summed over the study's runs, which two-process studies "
        "split between two processes); no "
        "benchmark file records its wall time. The GPU column is an estimate from FLOP counts."
    )


@table("headline", document="README.md")
def headline(results_dir: Path) -> str:
    """A few numbers from the tables of experiments/README.md, each with its file."""
    thr = {(r["attention"], r["n"]): r for r in read_csv(results_dir / "throughput/throughput.csv")}
    n_max = max(n for _, n in thr)
    speedup = thr[("dilated", n_max)]["tokens_per_s"] / thr[("dense", n_max)]["tokens_per_s"]
    longseq = read_json_rows(results_dir / "long_sequence/longseq.json")
    steps = [r for r in longseq if r["status"] == "ok"]
    longest = max(steps, key=lambda r: (r["n"], -r["peak_mib"]))
    ext = _context_parallel_rows(results_dir, ["context_parallel/context_parallel_extended.csv"])
    p4 = [r for r in ext if r["P"] == 4 and r["status"] == "ok"]
    recv = [r["fwd_received"] / 2**20 for r in p4]
    recall = read_csv(results_dir / "long_range_tiny/recall.csv")
    dense_256 = [r["accuracy"] for r in recall if r["run"] == "dense" and r["length"] == 256]
    t2 = {(r["model"], r["seq_len"]): {int(n): v for n, v in r["eval"].items()}
          for r in _table2_runs(results_dir)}  # fmt: skip
    demo_ppl = {
        r["context_length"]: r["ppl"]
        for r in read_json_rows(results_dir / "demo/ppl_vs_context.json")
    }
    demo_t = json.loads((results_dir / "demo/timing.json").read_text())
    recipe = "copying_calibration/trainpy_recipe/dense_"
    ppl = {
        r["context_length"]: r["ppl"] for r in read_csv(results_dir / f"{recipe}ppl_vs_context.csv")
    }
    span = {r["distance"]: r["drop"] for r in read_csv(results_dir / f"{recipe}repeated_span.csv")}
    rows = [
        [f"training throughput at {short(n_max)} tokens, tiny LongNet / dense", f"{speedup:.1f}x",
         "`experiments/results/throughput/throughput.csv`"],
        ["longest sequence trained in one step (2-core CPU, 24 GiB)",
         f"{short(longest['n'])} tokens, `{longest['mode']}`, {longest['step_s']:.0f} s, "
         f"{longest['peak_mib'] / 1024:.1f} GiB",
         "`experiments/results/long_sequence/longseq.json`"],
        ["received per rank per forward, 4 processes, segments up to N, "
         f"{short(min(r['n'] for r in p4))}-{short(max(r['n'] for r in p4))}",
         f"{min(recv):.0f}-{max(recv):.0f} MiB",
         "`experiments/results/context_parallel/context_parallel_extended.csv`"],
        ["`make demo` (LongNet 2 x 128, copying recipe): perplexity at 512 tokens of context "
         "against 64; training time on 2 cores",
         f"{100 * (demo_ppl[512] / demo_ppl[64] - 1):+.0f}%; "
         f"{demo_t['stage']['train_seconds'] + demo_t['main']['train_seconds']} s",
         "`experiments/results/demo/ppl_vs_context.json`, `demo/timing.json`"],
        ["Table 2 with the recipe, trained at 2048, scored at 8192 against 2048: LongNet; "
         "Sparse Transformer",
         "; ".join(f"{100 * (t2[(m, 2048)][8192] / t2[(m, 2048)][2048] - 1):+.0f}%"
                   for m in ("longnet", "sparse_transformer")),
         "`experiments/results/paper_table2_recipe/results.json`"],
        ["recall probe, dense attention at its training length (L = 256)",
         _percent_range(dense_256) + " at every distance",
         "`experiments/results/long_range_tiny/recall.csv`"],
        ["dense 2 x 128 trained with the copying recipe: perplexity at 512 tokens of context "
         "against 64; repeated-span drop at d = 64",
         f"{100 * (ppl[512] / ppl[64] - 1):+.0f}%; {span[64]:.2f} nats per token",
         f"`experiments/results/{recipe}ppl_vs_context.csv`, `{recipe}repeated_span.csv`"],
    ]  # fmt: skip
    return markdown(["measurement", "value", "file"], rows) + (
        "\n\nGenerated by `make report` from the files named; the commands that wrote them are "
        "beside the full tables in experiments/README.md."
    )


def _percent_range(values: list[float]) -> str:
    lo, hi = f"{min(values) * 100:.0f}", f"{max(values) * 100:.0f}"
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"


# -- markers ----------------------------------------------------------------------------------

MARKER = re.compile(r"<!-- (/?)report:([\w-]+) -->")


def markers(text: str) -> list[str]:
    """The names of the marked blocks in ``text``, in order; ReportError naming the marker
    when one opens without closing, closes without opening, nests or repeats."""
    names, open_name, seen = [], None, set()
    for m in MARKER.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if not closing:
            if open_name is not None:
                raise ReportError(f"marker report:{name} opens inside report:{open_name}")
            if name in seen:
                raise ReportError(f"marker report:{name} appears twice")
            open_name = name
        else:
            if open_name != name:
                raise ReportError(f"marker /report:{name} closes a block that is not open")
            names.append(name)
            seen.add(name)
            open_name = None
    if open_name is not None:
        raise ReportError(f"marker report:{open_name} is never closed (/report:{open_name})")
    return names


def replace(text: str, name: str, body: str) -> str:
    """``text`` with the block between ``name``'s markers set to ``body``."""
    markers(text)  # balanced
    start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    if start not in text:
        raise ReportError(f"marker report:{name} is missing")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body.strip()}\n{end}{tail}"


def render(text: str, document: str, results_dir: Path = RESULTS, tables=None) -> str:
    """``text`` (the document) with every table registered for ``document`` regenerated;
    a marker in it that no table makes is an error, and so is a table whose marker is missing."""
    tables = TABLES if tables is None else tables
    wanted = [name for name, t in tables.items() if t.document == document]
    for name in markers(text):
        if name not in wanted:
            raise ReportError(f"{document}: marker report:{name} names no table")
    for name in wanted:
        try:
            text = replace(text, name, tables[name].make(results_dir))
        except ReportError as err:
            raise ReportError(f"{document}: {err}") from None
    return text


def main(argv: list[str], root: Path = ROOT, results_dir: Path = RESULTS) -> int:
    check = "--check" in argv
    stale = 0
    for document in dict.fromkeys(t.document for t in TABLES.values()):
        path = root / document
        old = path.read_text()
        try:
            new = render(old, document, results_dir)
        except ReportError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if new == old:
            continue
        stale += 1
        if check:
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(keepends=True), new.splitlines(keepends=True),
                f"{document} (committed)", f"{document} (from the results files)"))  # fmt: skip
        else:
            path.write_text(new)
            print(f"wrote {document}")
    if check and stale:
        print("the tables differ from their files: run `make report`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The keys of a study YAML (configs/study/*.yaml): typed dataclasses, checked on load.

A study trains for hours and evaluates at the end, so a typo in its ``eval:`` or ``bench:``
section must fail before the first run trains, not after the last. :func:`load_study` merges
the YAML over its study's dataclass in OmegaConf's struct mode, as settings/loading.py does for
train.py: an unknown key or a value of the wrong type is a :class:`ConfigError` naming the key
and the file, and each class's ``__post_init__`` checks its values together. (The ``train:``
lists are train.py overrides: each run's resolved train.py config is checked by the study's
``plan``, also before anything trains.)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

from settings.loading import ConfigError, load_yaml

TABLE2_MODELS = {
    "transformer": "Transformer",
    "sparse_transformer": "Sparse Transformer",
    "longnet": "LongNet",
}


def _multiple(tokens_per_batch: int, seq_len: int, what: str = "seq_len") -> None:
    if seq_len < 1 or tokens_per_batch % seq_len:
        raise ValueError(
            f"tokens_per_batch={tokens_per_batch} is not a multiple of {what}={seq_len}"
        )


@dataclass
class StudyEval:
    context_lengths: list[int] = MISSING  # eval.py's context_lengths, ascending
    args: list[str] = field(default_factory=list)  # eval.py overrides, e.g. split=test

    def __post_init__(self):
        if not self.context_lengths or min(self.context_lengths) < 1:
            raise ValueError(
                f"eval.context_lengths must be positive lengths, got {self.context_lengths}"
            )


@dataclass
class DilationSchedule:
    segment_lengths: list[int] = MISSING  # w_i
    dilation_rates: list[int] = MISSING  # r_i, one per segment length


@dataclass
class Curriculum:
    seq_len: int = MISSING  # each run first trains at this length ...
    steps: int = MISSING  # ... for this many steps
    quick_steps: int | None = None  # with --quick (default: steps)
    train: list[str] = field(default_factory=list)  # train.py overrides of the stage
    shared: bool = False  # one stage (the first run's) that every run starts from


@dataclass
class StudySpec:
    """What every study names: the runs' shared recipe and how they are evaluated."""

    name: str = MISSING  # the study's directory: runs/<name>/
    tokens_per_batch: int = MISSING  # the same for every run: batch = this / seq_len
    steps: int = MISSING  # optimizer steps of every run
    train: list[str] = field(default_factory=list)  # train.py overrides shared by every run
    eval: StudyEval = MISSING
    curriculum: Curriculum | None = None  # a short stage before every run (runner.staged)

    def __post_init__(self):
        for key in ("tokens_per_batch", "steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.curriculum is not None:
            _multiple(self.tokens_per_batch, self.curriculum.seq_len, "curriculum.seq_len")


# -- the paper's Table 2 (paper_table2.py) -----------------------------------------------------


@dataclass
class Table2Run:
    model: str = MISSING  # transformer | sparse_transformer | longnet
    config: str = MISSING  # its model YAML, relative to the repository
    seq_len: int = MISSING  # its training length

    def __post_init__(self):
        if self.model not in TABLE2_MODELS:
            raise ValueError(f"run model {self.model!r} is not one of {sorted(TABLE2_MODELS)}")


@dataclass
class PaperTable:
    lengths: list[int] = MISSING  # the paper's evaluation lengths
    rows: list[list[Any]] = MISSING  # model, training length, batch, ppl at each length


@dataclass
class Table2Spec(StudySpec):
    schedule: DilationSchedule = MISSING  # every LongNet run's; sparse runs are FLOP-matched to it
    runs: list[Table2Run] = MISSING
    paper: PaperTable | None = None  # the paper's numbers, printed below ours

    def __post_init__(self):
        super().__post_init__()
        for run in self.runs:
            _multiple(self.tokens_per_batch, run.seq_len)


# -- the dilation-schedule ablation (ablate_dilation.py) ---------------------------------------


@dataclass
class Grid:
    """Geometric schedules: every combination of the lists is one."""

    w0: list[int] = MISSING  # the first segment length
    ratio: list[int] = MISSING  # w_i = w0 * ratio^i, r_i = ratio^i
    reach: list[int] = MISSING  # pairs until w reaches this
    drop_largest: list[int] = field(default_factory=lambda: [0])  # then this many removed


@dataclass
class StudyBench:
    seq_len: int = MISSING  # dilated attention alone, forward + backward, at this length
    repeats: int = 3  # median of this many

    def __post_init__(self):
        if self.seq_len < 1 or self.repeats < 1:
            raise ValueError(
                f"bench.seq_len and bench.repeats must be >= 1, got {self.seq_len}, {self.repeats}"
            )


@dataclass
class AblationSpec(StudySpec):
    model: str = MISSING  # the model YAML every schedule trains
    seq_len: int = MISSING  # the training length
    grid: Grid | None = None
    schedules: dict[str, DilationSchedule] = field(default_factory=dict)  # named, besides the grid
    bench: StudyBench = MISSING

    def __post_init__(self):
        super().__post_init__()
        _multiple(self.tokens_per_batch, self.seq_len)
        if self.grid is None and not self.schedules:
            raise ValueError("the study names no schedules: give a grid or schedules")


# -- long-range recall (long_range.py) ---------------------------------------------------------


@dataclass
class Quick:
    runs: list[str] = MISSING  # --quick trains these runs ...
    steps: int = MISSING  # ... for this many steps


@dataclass
class LongRangeSpec(StudySpec):
    model: str = MISSING  # the model YAML under every run
    seq_len: int = MISSING  # the training length
    runs: dict[str, list[str]] = MISSING  # name -> train.py overrides on top of `train`
    quick: Quick = MISSING

    def __post_init__(self):
        super().__post_init__()
        _multiple(self.tokens_per_batch, self.seq_len)
        for name in self.quick.runs:
            if name not in self.runs:
                raise ValueError(f"quick.runs names {name!r}, not one of {list(self.runs)}")


def load_study(path: str | Path, schema: type[StudySpec]) -> StudySpec:
    """A study YAML as its ``schema``, every key, type and value checked."""
    origin = f"study config {str(path)!r}"
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), load_yaml(path)))
    except ConfigKeyError as err:
        owner = err.object_type if is_dataclass(err.object_type) else schema
        known = [f.name for f in fields(owner)]
        close = difflib.get_close_matches(str(err.key), known, n=1, cutoff=0.5)
        parent = str(err.full_key).rpartition(".")[0]
        hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
        raise ConfigError(
            f"unknown key {err.full_key} in {origin} (not a key of {owner.__name__}){hint}"
        ) from None
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} in {origin}: missing, and it has no default") from None
    except ValidationError as err:
        raise ConfigError(f"{err.full_key} in {origin}: {str(err).splitlines()[0]}") from None
    except ValueError as err:  # a __post_init__ check
        raise ConfigError(f"{origin}: {err}") from None

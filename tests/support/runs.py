"""Arguments of the tests' training runs, built from the real configs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "debug" / "tiny.yaml"  # the smallest run exercising everything


def tiny_run(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """train.py arguments of a tiny run on the corpus under ``root``."""
    return [
        str(TINY_CONFIG),
        f"data.path={root / 'corpus'}",
        f"data.cache_dir={root / 'cache'}",
        f"run_dir={run_dir}",
        *extra,
    ]

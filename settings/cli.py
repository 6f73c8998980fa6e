"""The command-line contract of train.py and eval.py: a bad config is one line on stderr and
exit code 2; ``--print-config`` prints the resolved config of the command line and stops."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from settings.loading import ConfigError, split_argv, to_yaml

PRINT_CONFIG = "--print-config"


def run_cli(entry: Callable[[list[str]], object], argv: list[str], load=None) -> int:
    """Runs ``entry(argv)``; with ``--print-config``, prints ``load(files, overrides)`` as YAML
        instead. A ConfigError exits 2 with its message; an error with an ``exit_status`` (a
    preempted run, a failed checkpoint write, a diverged run) exits with that status and its
    message; anything else keeps its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if PRINT_CONFIG in argv:
            if load is None:
                raise ConfigError(f"{PRINT_CONFIG} is not supported here")
            print(to_yaml(load(*split_argv([a for a in argv if a != PRINT_CONFIG]))), end="")
            return 0
        entry(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        status = getattr(err, "exit_status", None)  # a run that stopped for a stated reason
        if status is None:
            raise
        print(f"error: {err}" if status != 0 and status < 128 else str(err), file=sys.stderr)
        return status
    return 0

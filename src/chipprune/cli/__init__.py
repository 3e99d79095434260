"""The `chip` command: profile, import, score, prune, evaluate, fine-tune and train CNNs with CHIP.

Each command parses its options (_parser), makes one call of the library (chipprune.api, in _commands) and prints
(_render); this module runs one and turns every refusal into one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from tqdm import tqdm

from .._memory import memory_reason, out_of_memory
from ..calibrate import CalibrationError
from ..data import DataError
from ..deploy.export import ExportError
from ..files.fileio import OutputError
from ..files.modelfile import ModelFileError
from ..files.scores import ScoresError
from ..pruning._torch_pruning import UntestedVersionError
from ..pruning.budgets import BudgetError
from ..pruning.sparsity import SparsityError
from ..training.loop import TrainError
from ..training.runs import RunError
from ._arguments import UsageError, quiet_stdout
from ._parser import build_parser

REFUSALS = (UsageError, ModelFileError, DataError, CalibrationError, SparsityError, TrainError, ExportError,
            OutputError, ScoresError, RunError, BudgetError, UntestedVersionError)  # fmt: skip


def _one_line(command: str) -> Any:
    """A warnings.showwarning that prints one plain line, as errors are, above any progress bar."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:  # fmt: skip
        tqdm.write(f"chip {command}: warning: {message}", file=sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    """Run the command line; exit code 2 with one line on stderr for bad input."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line(args.command)
            args.run(args)
            sys.stdout.flush()  # here, where a closed pipe is caught
    except REFUSALS as e:
        if os.environ.get("CHIP_DEBUG"):
            raise
        print(f"chip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chip {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        quiet_stdout()
        print(f"chip {args.command}: error: stdout was closed before all the output was written", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e) or os.environ.get("CHIP_DEBUG"):
            raise
        # sized_by: the option that sized the work, set beside it; none where no option did (import)
        advice = f": try a smaller {args.sized_by}" if getattr(args, "sized_by", None) else ""
        print(f"chip {args.command}: error: {memory_reason(e)}{advice}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

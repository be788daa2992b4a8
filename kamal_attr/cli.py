"""What the scripts share: turning a user error into one line and a non-zero exit."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from . import KamalError
from .distributed import leave_group


def one_line(error: BaseException) -> str:
    """The message of ``error``; for one re-raised from a DataLoader worker (whose text is a
    whole traceback) the last line, which holds the original message."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(error):
        return lines[-1].split(": ", 1)[-1]
    return str(error)


def resume_hint(overwrite: bool) -> str:
    """What Ctrl-C leaves of a training run, and what to do next. ``--overwrite`` starts each
    net over when its turn comes, so a rerun with it starts them over again, and one without
    it meets the nets this run had not reached yet, maybe still of their old recipe."""
    if not overwrite:
        return "saved epochs are kept: rerun the same command to resume"
    return ("saved epochs are kept: rerun without --overwrite to resume the interrupted net and "
            "reuse those this run finished (a net it had not reached stops the run if its recipe "
            "changed), or with --overwrite to start them over again")


def run(main: Callable[[], None], interrupted: str = "rerun the same command") -> None:
    """Call ``main``; a :class:`KamalError` (bad files or flags) exits 2 with ``error: ...``,
    Ctrl-C exits 130 saying what ``interrupted`` left. After a run under torchrun, the
    process leaves its group (NCCL warns at exit otherwise)."""
    try:
        main()
        leave_group()
    except KamalError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted; {interrupted}", file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors (unknown flag, value out of range) are one line and exit 2,
    like every other user error of the scripts."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

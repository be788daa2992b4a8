"""What the scripts share: turning a user error into one line and a non-zero exit."""
from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Any, Callable, Mapping, NoReturn

from . import KamalError
from .distributed import RaisedByMainProcess, barrier, leave_group


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


#: ``OSError``s that say a path cannot be written (a read-only or full disk, a file where a
#: folder goes, no permission): the user's to fix, one line. Others are bugs: a traceback.
WRITE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG}


def run(main: Callable[[], None], interrupted: str = "rerun the same command") -> None:
    """Call ``main``; a :class:`KamalError` (bad files or flags) exits 2 with ``error: ...``,
    a path that cannot be written (:data:`WRITE_ERRORS`) exits 1 with one such line, Ctrl-C
    exits 130 saying what ``interrupted`` left, and output piped into a command that stopped
    reading (``| head``) ends quietly. After a run under torchrun, the process leaves its
    group (NCCL warns at exit otherwise)."""
    try:
        main()
        leave_group()
    except RaisedByMainProcess as e:  # the main process prints it; we wait until it has
        if e.reported:
            barrier()
        leave_group()
        sys.exit(2)
    except KamalError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        if getattr(e, "shared", False):  # the others wait for this line (main_process_first)
            barrier()
        leave_group()
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted; {interrupted}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # Python's advice: no more output, and no error at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror} (check that path's permissions and free space, or "
              "choose another --save_root/--out)", file=sys.stderr)
        leave_group()
        sys.exit(1)


def refuse_ignored(mode: str, does: str, given: Mapping[str, Any]) -> None:
    """Stop when flags that ``mode`` would ignore were given (a value other than None or
    False): a flag that does nothing must not look as if it had done something."""
    used = [flag for flag, value in given.items() if value is not None and value is not False]
    if used:
        raise KamalError(f"{mode} {does}, so {', '.join(used)} would be ignored: drop "
                         f"{'it' if len(used) == 1 else 'them'}, or drop {mode}")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors (unknown flag, value out of range) are one line and exit 2,
    like every other user error of the scripts. A module of the package run as
    ``python -m kamal_attr.<module>`` is named so in its usage and hints (argparse would
    name its file, which cannot be run as ``<module>.py``)."""

    def __init__(self, *args, **kwargs) -> None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if "prog" not in kwargs and spec is not None and spec.name.startswith(f"{__package__}."):
            kwargs["prog"] = f"python -m {spec.name}"
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

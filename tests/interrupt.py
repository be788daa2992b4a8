"""Run one of the scripts and interrupt it as the OS or a user would, at a chosen point.

    python tests/interrupt.py kill N   SCRIPT ARGS...   # SIGKILL right after the N-th last.pth
    python tests/interrupt.py ctrl-c N SCRIPT ARGS...   # SIGINT at the N-th training step

The signals are real (``os.kill`` of this process); only *when* they come is chosen, by
wrapping the checkpoint writer and the methods' ``forward_train``, so the resume tests do
not depend on timing.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

import kamal_attr.methods as methods
import kamal_attr.stages as stages

mode, when, script, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
count = 0

if mode == "kill":
    save = stages.atomic_save

    def atomic_save_then_kill(obj, path):
        global count
        save(obj, path)
        count += Path(path).name == "last.pth"
        if count == when:
            os.kill(os.getpid(), signal.SIGKILL)

    stages.atomic_save = atomic_save_then_kill
elif mode == "ctrl-c":
    # A shell without job control starts background commands with SIGINT ignored, and
    # Python then leaves it ignored: a test suite run with ``&`` would see no Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for cls in (methods.SourceTraining, methods.SelectiveAmalgamation, methods.TargetAmalgamation):
        def forward_train(self, *a, _inner=cls.forward_train):
            global count
            count += 1
            if count == when:
                os.kill(os.getpid(), signal.SIGINT)
            return _inner(self, *a)
        cls.forward_train = forward_train
else:
    sys.exit(f"unknown mode {mode!r}")

sys.argv = [script, *args]
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")

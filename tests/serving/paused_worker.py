"""`python -m vllm_surgery.cli ...`, except that the worker stops itself (SIGSTOP) as it enters
refine(): the version directory is reserved, nothing is written into it yet, and the lease is held.

The killed-worker test needs the worker killed in the middle of a job. Waiting for the reserved
directory and then killing raced on a fast machine (the refinement finished between two polls); a
worker stopped at a known point is killed there on any machine. Everything else is the real CLI.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from vllm_surgery.cli import main

# the module, not the package's function of the same name; the worker imports refine from it per job
engine = importlib.import_module("vllm_surgery.refine")
_refine = engine.refine


def _stopped_refine(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGSTOP)
    return _refine(*args, **kwargs)


engine.refine = _stopped_refine

if __name__ == "__main__":
    sys.exit(main())

"""Imported first by every script, before torch: a Ctrl-C in the seconds torch takes to load ends the program with
one line and exit code 130, not a page of traceback from inside torch's import. From the moment the script's
main() runs, plumbing.run_main handles Ctrl-C (and keeps a run's record and weights).
"""

import os
import signal
import sys
from pathlib import Path


def _interrupted(signum, frame):
    print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr, flush=True)
    os._exit(128 + signum)  # nothing has started yet that needs cleaning up


# Only when one of this project's scripts is the program: a test session, or your own program importing a
# script, keeps Python's usual KeyboardInterrupt.
_program = getattr(sys.modules["__main__"], "__file__", None)
_here = Path(__file__).resolve().parent
if _program and Path(_program).resolve().parent in (_here, _here / "benchmarks"):
    signal.signal(signal.SIGINT, _interrupted)

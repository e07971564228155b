"""Imported by each script before torch: a Ctrl-C in the seconds torch takes to load ends the program with one
line and exit code 130, not a page of traceback from inside torch's import. Once the script's main() runs,
plumbing.run_main handles Ctrl-C (and keeps a run's record and weights).
"""

import os
import signal
import sys
from pathlib import Path


def _interrupted(signum, frame):
    print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr, flush=True)
    os._exit(128 + signum)  # nothing has started yet that needs cleaning up


def _importer():
    """The module whose `import quiet_ctrl_c` runs this file (import machinery's own frames skipped)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    return frame.f_globals.get("__name__") if frame is not None else None


# Only when the program itself imports this (`python cnn.py`): a test session, or your own program importing
# cnn.py, keeps Python's usual KeyboardInterrupt.
if _importer() == "__main__":
    signal.signal(signal.SIGINT, _interrupted)

"""Stops and exit codes. Imported first (common.py's first import), so that from the program's first moment a Ctrl-C,
SIGTERM or SIGHUP ends it in one line with the signal's exit code instead of a traceback: the one import in the
project with a side effect. It imports only small standard modules before installing that guard. A signal the user
chose to ignore (`nohup` ignores SIGHUP) stays ignored, here and wherever a handler is installed later.

run_main calls a script's main() and turns what a user can cause into one line on stderr and an exit code.
"""

import errno
import os
import signal
import sys
import threading

STOP_SIGNALS = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])  # no SIGHUP on Windows
HANDLED = [signal.SIGINT, *STOP_SIGNALS]


def handle(handlers):
    """Install {signal: handler}, but leave a signal that is ignored (SIG_IGN: `nohup`, a background job) ignored.
    Returns the handlers replaced, to put back. Outside the main thread (main() called by a GUI's or a web app's
    worker) Python installs none: nothing is, the program around it keeps its own, and that is said once."""
    try:
        return {s: signal.signal(s, h) for s, h in handlers.items() if signal.getsignal(s) is not signal.SIG_IGN}
    except ValueError:  # "signal only works in main thread": the first install failed, so none was made
        if not _said_not_main:
            _said_not_main.append(True)
            print(NOT_MAIN, file=sys.stderr)
        return {}


_said_not_main = []
NOT_MAIN = "note: running outside the main thread: Ctrl-C and stop signals are left to the program around it"


def stopped_line(signum):
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def _quiet_exit(signum, frame):
    """A stop while the program loads (torch takes seconds) or after its work is done: there is nothing to keep,
    so one line and the usual exit code, at once (an exception here could land inside torch's C++ start-up)."""
    os.write(2, f"{os.path.basename(sys.argv[0])}: {stopped_line(signum)}\n".encode())
    os._exit(128 + signum)


def _program_is_ours():
    """Whether the program running is one of the project's scripts, tools or benchmarks, run alone (`python cnn.py`,
    `python -m`): the process ends when it does. Not the test suite, nor a program of the user's that imports a
    script, nor a host that runs one and goes on (IPython's %run, Jupyter, runpy, pdb, Spyder's runfile): there
    Ctrl-C stays the host's."""
    main = sys.modules.get("__main__")
    file = getattr(main, "__file__", None)
    here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if file is None or os.path.dirname(os.path.realpath(file)) not in (here, os.path.join(here, "benchmarks")):
        return False
    frame = sys._getframe()
    while frame is not None and frame.f_globals is not vars(main):  # the program's own code
        frame = frame.f_back
    if frame is None:
        return False
    below = []  # what runs the program: nothing, or runpy for `python -m`; a host has frames of its own
    while (frame := frame.f_back) is not None:
        below.append(frame.f_globals.get("__name__"))
    return all(name == "runpy" for name in below)


if _program_is_ours():  # the guard: from here on, a stop is one line
    handle(dict.fromkeys(HANDLED, _quiet_exit))


class UserError(Exception):
    """A problem the user can fix (bad setting, bad data, unwritable folder): one line, exit code 2."""


class Diverged(Exception):
    """The training loss, or an evaluation, became NaN or infinite: exit code 1."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler) or SIGHUP (a closed terminal): handled like Ctrl-C, the record is kept."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


class signals_deferred:
    """Ctrl-C and the stop signals wait until the block ends: what it writes together (an epoch's weights and the
    record that names them) is never cut in two. One that came meanwhile is raised as the block ends. Entered again
    inside itself, it defers to the outer block; its depth is each thread's own (two runs in an app's workers)."""

    nested = threading.local()

    def __enter__(self):
        self.received, self.outer = [], not getattr(self.nested, "depth", 0)
        if self.outer:
            self.previous = handle({s: lambda signum, frame: self.received.append(signum) for s in HANDLED})
        self.nested.depth = getattr(self.nested, "depth", 0) + 1

    def __exit__(self, *exc):
        self.nested.depth -= 1
        if self.outer:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            if self.received:
                signal.raise_signal(self.received[0])


def shown(text):
    """Text from a file, or a file's name, as it can be printed and drawn: on one line, and unable to drive the
    terminal. Bytes of a name that are not UTF-8 become \\xff, and each character that cannot be shown (a newline, the
    ESC of an escape sequence) its escape (\\n, \\x1b). Text printed escaped once is printed the same again."""
    text = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate (JSON may hold one): escaped with the rest below
        pass
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _out_of_memory(error):
    text, torch = str(error), sys.modules.get("torch")
    if isinstance(error, MemoryError) or torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def _output_gone():
    """Point stdout at /dev/null, so that Python's own flush at exit meets no closed pipe or full disk either."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run_main(main, argv=None, memory=()):
    """Call main(argv) and turn the expected failures into exit codes and one line on stderr. argv None: the
    command line's flags (sys.argv[1:]); main() called from Python reads none of them (a notebook's are its kernel's).

    2 user error, out of memory (the advice names the flags in `memory`: the settings that size the script's
    tensors) or an output that cannot be written (stdout on a full disk), 1 diverged, 130 Ctrl-C, 128 + the signal
    for SIGTERM (143), SIGHUP (129) and a reader that went away (`| head`: 141, as `cat` ends, with no message of its
    own). Names the terminal's encoding cannot show are printed escaped.
    """
    script = os.path.basename(sys.argv[0])
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    previous = handle({signal.SIGINT: signal.default_int_handler, **dict.fromkeys(STOP_SIGNALS, _stop)})
    try:
        main(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # lines still buffered meet a closed pipe or a full disk here, not at exit
    except UserError as error:  # it may quote a file (a record's settings, a tensor's name): shown, as all such text
        print(f"{script}: error: {shown(error)}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"{script}: error: the loss became NaN or infinite ({error}); try a smaller --lr", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # Ctrl-C, or Stopped: SIGTERM, SIGHUP
        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"{script}: {stopped_line(signum)}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        _output_gone()
        return 128 + 13  # as a program ended by SIGPIPE, which Python turns into this exception instead
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EIO):  # writing the output failed; other errors are ours
            raise
        _output_gone()
        print(f"{script}: error: cannot write its output ({error.strerror}); send it elsewhere", file=sys.stderr)
        return 2
    except Exception as error:
        if not _out_of_memory(error):
            raise
        reason = (str(error).splitlines() or [type(error).__name__])[0][:160]  # a MemoryError may have no message
        flags = ["--" + name.lower().replace("_", "-") for name in memory]
        advice = "close other programs, or use a device with more memory"
        if flags:
            advice = "use a smaller " + (", ".join(flags[:-1]) + " or " if len(flags) > 1 else "") + flags[-1]
        print(f"{script}: error: out of memory ({reason}); {advice}", file=sys.stderr)
        return 2
    finally:  # a program run alone ends now: a stop ends it quietly; a host (%run, runpy) gets its own back
        ours = getattr(main, "__module__", "") == "__main__" and _program_is_ours()
        for s, handler in previous.items():
            signal.signal(s, _quiet_exit if ours else handler)
    return 0

"""How every `python -m ehin.*` and `python -m bench.*` command ends on a user's mistake.

A problem the user caused and can fix (a config key, a data folder, a path, an argument, a missing
file) is printed as one line naming it, and the command exits 2, without a traceback; `--debug` on
the command line or `EHIN_DEBUG=1` shows the full traceback instead. Code raises `UserError` (or a
subclass: ConfigError, ReferFormatError, ...) for such problems; anything else is a bug and keeps
its traceback. Ctrl-C exits 130 with one line.

    @command
    def main(argv: list[str] | None = None) -> int: ...

This module imports nothing heavy: bench's entry points use it too (ehin never imports bench).
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class UserError(ValueError):
    """A problem the user caused and can fix; the message names it and, where it can, the fix.

    A ValueError, so code that caught ValueError before keeps catching it."""


# Missing or unreadable paths the user gave are theirs to fix as well.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, PermissionError)

F = TypeVar("F", bound=Callable)


def command_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a `python -m` command: its module docstring as the description, kept as
    written (usage examples stay on their lines). Options are spelled out: a command that passes its own
    argv on to child processes less some options (bench.perf --procs/--ddp) must find them by name."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("EHIN_DEBUG", "") not in ("", "0")


def command(main: F | None = None, *, also: tuple[type[BaseException], ...] = ()) -> F:
    """Wrap a `main(argv)`: user errors (and the `also` types) become one line and exit 2.

    `--debug` is taken out of argv before main's parser sees it."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(argv: Sequence[str] | None = None):
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = debug_requested(argv)
            argv = [a for a in argv if a != "--debug"]
            try:
                return fn(argv)
            except USER_ERRORS + also as e:
                if debug:
                    raise
                print(f"error: {_message(e)}", file=sys.stderr)
                print("(add --debug or set EHIN_DEBUG=1 to see the traceback)", file=sys.stderr)
                raise SystemExit(EXIT_USER_ERROR) from None
            except KeyboardInterrupt:
                if debug:
                    raise
                print("interrupted", file=sys.stderr)
                raise SystemExit(EXIT_INTERRUPTED) from None

        return wrapper  # type: ignore[return-value]

    return wrap(main) if main is not None else wrap  # type: ignore[return-value]


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:  # "[Errno 2] No such file ..." -> plain words
        return f"{e.strerror}: {e.filename}"
    return str(e).strip() or type(e).__name__


def _exit_on_term(signum, frame) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def on_sigterm(handler) -> Iterator[None]:
    """Within the block SIGTERM goes to `handler` (a function, or signal.SIG_IGN); the handler before is put
    back after. Only in the main thread, where Python handles signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def sigterm_unwinds() -> AbstractContextManager[None]:
    """Within the block SIGTERM (a `timeout`, a `kill`, a lent machine's end) raises SystemExit(143), so the
    block's `finally`s and `except BaseException`s run: what it started (an MPS daemon, child processes) is
    ended, not left behind."""
    return on_sigterm(_exit_on_term)

"""Console logging of the command line: Prefect's stage logs stay, its tracebacks of user errors go.

A :class:`dotresize.DotResizeError` raised inside a task is a bad input, not a crash: the CLI prints it as one
``dotresize: error: ...`` line, so the console drops Prefect's traceback and "Failed" lines about it (they still
reach the Prefect API and the task's state). So is an :class:`OSError` the CLI reports in one line (disk full,
read-only filesystem, permission denied: :data:`USER_ERRNOS`).

Nothing here imports :mod:`dotresize` (which loads torch and transformers): the command line sets this up first,
and a bad input is refused before any heavy import. :class:`DotResizeError` is looked up once it is loaded.
"""

from __future__ import annotations

import errno
import logging
import re
import sys

#: OSErrors that are the user's to fix (the CLI prints them as one line naming the path)
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_ERRNO_TEXT = re.compile(r"\[Errno (%s)\]" % "|".join(str(n) for n in sorted(USER_ERRNOS)))


def _dotresize_error() -> type | None:
    module = sys.modules.get("dotresize.errors")
    return getattr(module, "DotResizeError", None)


def is_user_error(error: BaseException | None) -> bool:
    """A :class:`DotResizeError` or an OSError in :data:`USER_ERRNOS`: printed as one line, never a traceback."""
    base = _dotresize_error()
    if base is not None and isinstance(error, base):
        return True
    return isinstance(error, OSError) and error.errno in USER_ERRNOS


def _error_names() -> tuple[str, ...]:
    base = _dotresize_error()
    if base is None:
        return ()
    names, todo = set(), [base]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return tuple(sorted(names))


class UserErrorFilter(logging.Filter):
    """Drops records about a DotResizeError (by exception, or by name in an error or failed-state message) and,
    once one was seen, the "upstream did not complete" records of the tasks waiting on it."""

    seen_user_error = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if is_user_error(exc):
            return self._drop()
        if record.levelno >= logging.WARNING or "Failed" in str(record.msg):
            message = record.getMessage()
            if any(name in message for name in _error_names()) or _ERRNO_TEXT.search(message):
                return self._drop()
            if UserErrorFilter.seen_user_error and ("did not reach a 'COMPLETED' state" in message
                                                    or record.name.startswith("distributed.")):
                return False  # tasks waiting on the failed one, and Dask cancelling them
        return True

    @staticmethod
    def _drop() -> bool:
        UserErrorFilter.seen_user_error = True
        return False


class CliFormatter(logging.Formatter):
    """``HH:MM:SS dotresize[<task run>]: message``: Prefect's task and flow run names kept, nothing else."""

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        where = f"dotresize[{name}]" if name else "dotresize"
        line = f"{self.formatTime(record, '%H:%M:%S')} {where}: {record.getMessage()}"
        if record.exc_info and not is_user_error(record.exc_info[1]):
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_cli_logging(level: int) -> None:
    """The command line's console logging on stderr (set up before Prefect, which then keeps it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CliFormatter())
    handler.addFilter(UserErrorFilter())
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h.formatter, CliFormatter)]
    root.addHandler(handler)
    root.setLevel(level)


def install_user_error_filter() -> None:
    """Add :class:`UserErrorFilter` to the root logger's console handlers (Prefect's, after its set-up), and
    point them at the current ``sys.stderr`` (a handler set up earlier may hold a stream since replaced)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, UserErrorFilter) for f in handler.filters):
            handler.addFilter(UserErrorFilter())
        console = getattr(handler, "console", None)  # Prefect's rich console handler
        if console is not None and hasattr(console, "file"):
            console.file = sys.stderr

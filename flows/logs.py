"""Console logging of the command line: one line per stage on the console, every task's lines in the run's log.

A compression's console (``compress``, ``sweep``) shows warnings and errors, the records marked :data:`CONSOLE`
(one line per stage: ``capture: computed 30, reused 0 (41.2 s)``), progress bars and the command's summary;
every other record of the Prefect runs (``computing capture[3] ...``, ``Finished in state Completed()``) goes to
the run directory's log file (:data:`storage.rundir.CONSOLE_LOG`, :class:`RunLogHandler`). ``-v`` shows them
all on the console as well.

A :class:`dotresize.DotResizeError` raised inside a task is a bad input, not a crash: the CLI prints it as one
``dotresize: error: ...`` line, so the console drops Prefect's traceback and "Failed" lines about it (they still
reach the Prefect API and the task's state). So is an :class:`OSError` the CLI reports in one line (disk full,
read-only filesystem, permission denied: :data:`USER_ERRNOS`).

Nothing here imports :mod:`dotresize` (which loads torch and transformers): the command line sets this up first,
and a bad input is refused before any heavy import. :class:`DotResizeError` is looked up once it is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import posixpath
import re
import sys
from collections.abc import Iterator
from pathlib import Path

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
                                                    or "cancelled by the task runner" in message
                                                    or record.name.startswith("distributed.")):
                return False  # tasks waiting on the failed one, the thread pool or Dask cancelling them
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


#: ``extra=`` of a record the default console shows (a stage's one line)
CONSOLE = {"console": True}


def _in_prefect_run() -> bool:
    context = sys.modules.get("prefect.context")  # not loaded: no run
    return context is not None and (context.TaskRunContext.get() is not None
                                    or context.FlowRunContext.get() is not None)


class ConsoleFilter(logging.Filter):
    """The default console of a compression: warnings and errors, the records marked :data:`CONSOLE`, the
    command's own voice (the ``dotresize`` logger: waiting for a busy run directory, a sweep's cells) and the
    library's messages (``dotresize.*``) outside the Prefect runs; the rest is for the run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or getattr(record, "console", False) or record.name == "dotresize":
            return True
        if getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None) or _in_prefect_run():
            return False
        return record.name.startswith("dotresize.")


class ConsoleFormatter(CliFormatter):
    """A record marked :data:`CONSOLE` as its bare message; any other as :class:`CliFormatter` writes it."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "console", False) and not record.exc_info:
            return record.getMessage()
        return super().format(record)


def configure_cli_logging(level: int, runs_to_file: bool = False) -> None:
    """The command line's console logging on stderr (set up before Prefect, which then keeps it).

    ``runs_to_file``: the default console of a compression (:class:`ConsoleFilter`); the records it leaves out
    are for :func:`run_log`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter() if runs_to_file else CliFormatter())
    handler.addFilter(UserErrorFilter())
    if runs_to_file:
        handler.addFilter(ConsoleFilter())
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers
                        if isinstance(h, RunLogHandler) or not isinstance(h.formatter, CliFormatter)]
    root.addHandler(handler)
    root.setLevel(level)


def install_user_error_filter() -> None:
    """Add :class:`UserErrorFilter` to the root logger's console handlers (Prefect's, after its set-up), and
    point them at the current ``sys.stderr`` (a handler set up earlier may hold a stream since replaced)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogHandler):  # the log file keeps every record
            continue
        if not any(isinstance(f, UserErrorFilter) for f in handler.filters):
            handler.addFilter(UserErrorFilter())
        console = getattr(handler, "console", None)  # Prefect's rich console handler
        if console is not None and hasattr(console, "file"):
            console.file = sys.stderr


# --- the run's log file ------------------------------------------------------------------------------------------
def _announced_run_dir(record: logging.LogRecord) -> str | None:
    """The run directory a record announces: its ``run_dir`` attribute (``extra={"run_dir": run.uri()}``), or the
    flow's first line, ``run <dir> (key ...): ...``."""
    run_dir = getattr(record, "run_dir", None)
    if run_dir:
        return str(run_dir)
    if isinstance(record.msg, str) and record.msg.startswith("run %s (key ") and record.args:
        return str(record.args[0])
    return None


def _local(target: str) -> Path | None:
    if target.startswith("file://"):
        return Path(target[len("file://"):])
    return None if "://" in target else Path(target)


class RunLogHandler(logging.Handler):
    """Every record of a compression, formatted as the ``-v`` console writes it, appended to the run directory's
    :data:`storage.rundir.CONSOLE_LOG`.

    The directory is the one the flow announces (:func:`_announced_run_dir`; a sweep announces one per cell).
    Records are held back until that directory exists: the log never creates it (a fresh run directory is the
    flow's, which removes it again when the run fails). Locally every record is written at once (an interrupted
    run keeps its log); a remote run directory (``s3://...``) gets its log when the handler closes."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(CliFormatter())
        self.target: str | None = None
        self.pending: list[str] = []
        self.stream = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            announced = _announced_run_dir(record)
            if announced is not None and announced != self.target:
                self._finish()
                self.target = announced
            line = self.format(record)
            if self.stream is None:
                self._open()
            if self.stream is None:
                self.pending.append(line)
            else:
                self.stream.write(line + "\n")
                self.stream.flush()
        except Exception:  # noqa: BLE001 - logging's own reporting (handleError prints it once)
            self.handleError(record)

    def _file_name(self) -> str:
        from storage.rundir import CONSOLE_LOG  # storage loads torch: only once a run has started

        return CONSOLE_LOG

    def _open(self) -> None:
        directory = _local(self.target) if self.target else None
        if directory is None or not directory.is_dir():
            return
        self.stream = open(directory / self._file_name(), "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        for line in self.pending:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.pending = []

    def _finish(self) -> None:
        """Close the current run's log (a remote one is written now); the next records are another run's."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        elif self.target is None:
            return  # the lines before the first announcement are the first run's
        elif self.pending and _local(self.target) is None:
            self._write_remote(self.target, "".join(line + "\n" for line in self.pending))
        self.pending = []

    def _write_remote(self, target: str, text: str) -> None:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(target)
            if not fs.isdir(root):  # removed (a failed fresh run) or never created
                return
            path = posixpath.join(root, self._file_name())
            before = fs.cat_file(path) if fs.exists(path) else b""
            fs.pipe_file(path, before + text.encode())
        except (OSError, ValueError, ImportError) as error:  # the run's result stands without its log
            logging.getLogger("dotresize").debug("the log of %s was not written: %s", target, error)

    def close(self) -> None:
        self.acquire()
        try:
            self._finish()
        finally:
            self.release()
        super().close()


@contextlib.contextmanager
def run_log() -> Iterator[RunLogHandler]:
    """Inside the block, every record reaching the root logger also goes to the announced run's log file."""
    handler = RunLogHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def compression_console(verbose: bool, mlflow: bool) -> Iterator[None]:
    """The console of a compression (``compress``, ``sweep``) while inside the block: Prefect's console handlers
    filtered for user errors, every record also in the run's log file (:func:`run_log`), MLflow's lines and (but
    with ``verbose``) transformers' model-loading bars off the console."""
    install_user_error_filter()
    if not verbose:  # every task loading a model drew its bars; the run's own bars remain
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if mlflow:
        route_mlflow_output()
    with run_log():
        yield


class _LinesToLog:
    """A text stream whose lines become INFO records of ``logger``."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.partial = ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(text)

    def flush(self) -> None:
        """Lines are logged as they complete."""


def route_mlflow_output() -> None:
    """MLflow's console lines ("Creating initial MLflow database tables...", "Successfully registered model ...")
    become records of its ``mlflow`` logger on the root's handlers: the run's log file, the console with ``-v``
    (its warnings always). Imports MLflow (the run registers its model with it anyway)."""
    from mlflow.utils import logging_utils

    logger = logging.getLogger("mlflow")
    logger.handlers = []
    logger.propagate = True
    logging_utils.MLFLOW_LOGGING_STREAM = _LinesToLog(logger)  # what eprint() writes to

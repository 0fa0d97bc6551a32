"""Copies of a finished model directory to where the user asked (``compress --out``)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def copy_model(model_dir: Path, out: Path, overwrite: bool) -> Path:
    """Copy the run's model directory to ``out``: filled under a temporary sibling name, then renamed into place.

    An existing ``out`` is replaced only when empty or, with ``overwrite``, a previous dotresize export -- checked
    again here, as it may have changed while the run went on. A failure (a full disk) leaves nothing new behind
    and the old ``out`` in place.
    """
    import os
    import shutil
    import tempfile

    from dotresize.permissions import apply_umask_tree
    from storage.atomic import swap_dir

    from .preflight import PreflightError, is_export

    out = Path(os.path.realpath(out))
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (overwrite and is_export(out)))):
        raise PreflightError(f"--out {out} was changed by something else during the run and is not replaceable "
                             f"now: the model is in {model_dir}")
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for directory, _, files in os.walk(model_dir):  # file by file: an OSError names the file (not shutil.Error)
            target = tmp / Path(directory).relative_to(model_dir)
            target.mkdir(exist_ok=True)
            for name in files:
                try:
                    shutil.copy2(Path(directory) / name, target / name)
                except OSError as error:
                    if not error.filename2:  # a failed write may name no file, or only the source
                        error.filename2 = str(target / name)
                    raise
        apply_umask_tree(tmp)  # mkdtemp made it 0700, and the run's files may be 0600
        swap_dir(tmp, out)  # the old out is put back if the rename fails
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    return out


__all__ = ["copy_model"]

"""Issue 14: storage's one atomic-write helper (storage/atomic.py) keeps the old file on any failure."""

from __future__ import annotations

import os

import pytest

from dotresize.permissions import current_umask
from storage.atomic import atomic_file, swap_dir, write_atomic


def _leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "data.json"
    write_atomic(target, "one")
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as staged:
            with open(staged.path, "w") as handle:
                handle.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "one" and _leftovers(target.parent) == []
    with atomic_file(target, fsync=True) as staged:
        with open(staged.path, "w") as handle:
            handle.write("two")
        staged.abandon()  # e.g. the target was removed meanwhile: nothing is put in place
    assert target.read_text() == "one" and _leftovers(target.parent) == []
    write_atomic(target, b"three", fsync=True)
    assert target.read_bytes() == b"three"
    assert target.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # what open() gives, not mkstemp's 0600


def test_a_directory_is_swapped_in_and_the_old_one_put_back_on_failure(tmp_path, monkeypatch):
    final, new = tmp_path / "model", tmp_path / ".model.tmp"
    final.mkdir()
    (final / "old").write_text("old")
    new.mkdir()
    (new / "new").write_text("new")
    real_replace = os.replace

    def failing(src, dst):
        if str(src) == str(new):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        swap_dir(new, final)
    assert sorted(os.listdir(final)) == ["old"]
    monkeypatch.setattr(os, "replace", real_replace)
    swap_dir(new, final)
    assert sorted(os.listdir(final)) == ["new"] and not new.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".model.old")] == []

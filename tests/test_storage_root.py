"""The Zarr root group is opened safely while another task is creating it."""

import pytest


def _flaky_open_group(real, calls, transient_failures):
    from zarr.errors import GroupNotFoundError

    def open_group(store, mode=None, **kwargs):
        calls.append(mode)
        if mode == "w-":
            real(store, mode="w-", **kwargs)  # another task wins the creation
            raise FileExistsError("another task created it")
        if mode == "r+" and calls.count("r+") <= 1 + transient_failures:
            raise GroupNotFoundError(store, "")  # its metadata is not readable yet
        return real(store, mode=mode, **kwargs)

    return open_group


def test_root_group_is_opened_once_the_other_task_has_written_it(monkeypatch, tmp_path):
    import zarr

    from storage import activations

    calls: list = []
    monkeypatch.setattr(zarr, "open_group", _flaky_open_group(zarr.open_group, calls, transient_failures=2))
    group = activations._open_or_create_root(zarr.storage.LocalStore(str(tmp_path / "costs.zarr")))
    assert calls == ["r+", "w-", "r+", "r+", "r+"]
    assert group.path == ""


def test_a_root_group_that_never_becomes_readable_is_a_clear_error(monkeypatch, tmp_path):
    import zarr

    from storage import activations
    from storage.errors import StorageError

    monkeypatch.setattr(activations, "_ROOT_WAIT_SECONDS", 0.2)
    monkeypatch.setattr(zarr, "open_group", _flaky_open_group(zarr.open_group, [], transient_failures=10**6))
    with pytest.raises(StorageError, match="delete that directory and run again"):
        activations._open_or_create_root(zarr.storage.LocalStore(str(tmp_path / "costs.zarr")))

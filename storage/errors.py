"""Errors raised by the storage layer."""


class StorageError(Exception):
    """Base class of storage errors."""


class CorruptArtifactError(StorageError):
    """A stored file or array does not match its recorded digest (or cannot be decoded)."""


class MissingArtifactError(StorageError, FileNotFoundError):
    """A stored file that a manifest names does not exist."""

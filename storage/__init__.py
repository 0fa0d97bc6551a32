"""The pipeline's state: run directories, Zarr activation stores, basis files, manifests and digests.

Knows nothing about Prefect, MLflow or the method: it stores arrays, tensors and JSON, atomically and with
digests, so that a stage can tell a complete output from a partial or corrupted one.
"""

from .activations import MIN_CHUNK_BYTES, ActivationStore, PointWriter, chunk_rows
from .artifacts import (
    basis_status,
    evaluation_entries,
    finish_stage,
    load_basis,
    manifest_status,
    read_manifest,
    read_stage_manifest,
    save_basis,
    stage_manifests,
    write_manifest,
)
from .digests import canonical_json, content_key, digest_of_digests, sha256_array, sha256_bytes
from .errors import CorruptArtifactError, MissingArtifactError, StorageError
from .records import Lineage, RecordVersionError, RunRecipe, StageManifest, WatchVariant
from .rundir import RunDir, is_model_dir, is_run_dir

__all__ = [
    "ActivationStore", "PointWriter", "chunk_rows", "MIN_CHUNK_BYTES", "RunDir",
    "save_basis", "load_basis", "basis_status", "write_manifest", "read_manifest", "manifest_status",
    "finish_stage", "read_stage_manifest", "stage_manifests", "evaluation_entries", "StageManifest", "Lineage", "RunRecipe", "WatchVariant",
    "RecordVersionError", "is_run_dir", "is_model_dir",
    "content_key", "canonical_json", "digest_of_digests", "sha256_array", "sha256_bytes",
    "StorageError", "CorruptArtifactError", "MissingArtifactError",
]

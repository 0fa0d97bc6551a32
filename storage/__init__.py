"""The pipeline's state: run directories, Zarr activation stores, basis files, manifests and digests."""

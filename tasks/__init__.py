"""Thin Prefect tasks: each calls dotresize/ and storage/ and returns a small manifest."""

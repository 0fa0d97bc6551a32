"""Composition: Prefect flows, the command-line interface and MLflow logging."""

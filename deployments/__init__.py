"""Prefect deployments (prefect.yaml) and schedules."""

"""Process settings every entry point applies first: no telemetry, no analytics, quiet tokenizers."""

from __future__ import annotations

import os


def apply_offline_defaults() -> None:
    """Set, unless the user set them: nothing leaves the machine, and tokenizers do not fork-warn."""
    for key, value in {
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
        # MLflow prints "View run ... at: http://..." to stdout when a run against a tracking server ends: stdout
        # is the command's result (--json), so the links stay in the MLflow UI
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }.items():
        os.environ.setdefault(key, value)

"""``dotresize serve``: serve the deployments of ``deployments/prefect.yaml`` from this machine.

The same file is what ``prefect deploy --all --prefect-file deployments/prefect.yaml`` registers on a Prefect
server for a work pool; here every deployment is built with ``RunnerDeployment.from_entrypoint`` from its
entrypoint, parameters, schedules, tags and description, and served with Prefect's ``serve`` (scheduled and
manually triggered runs execute as subprocesses of this process, in the repository root).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dotresize.errors import DotResizeError

#: keys of a prefect.yaml deployment that serving uses; the others (work_pool, build/push/pull, ...) are for
#: `prefect deploy` and workers
SERVED_KEYS = ("name", "entrypoint", "description", "parameters", "schedules", "schedule", "tags", "version",
               "concurrency_limit", "enforce_parameter_schema", "paused")
KNOWN_KEYS = SERVED_KEYS + ("work_pool", "build", "push", "pull", "triggers", "flow_name", "version_type",
                            "sla", "job_variables")


class DeploymentError(DotResizeError):
    """deployments/prefect.yaml is missing, malformed, or names an unknown deployment."""


def project_root() -> Path:
    """The directory holding the ``flows`` package: entrypoints and relative paths are relative to it."""
    import flows

    return Path(flows.__file__).resolve().parent.parent


def default_file() -> Path:
    import deployments

    return Path(deployments.__file__).resolve().parent / "prefect.yaml"


def load_deployments(path: str | os.PathLike | None = None) -> list[dict]:
    import yaml

    path = Path(path) if path else default_file()
    if not path.is_file():
        raise DeploymentError(f"{path} does not exist: pass --file with a prefect.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise DeploymentError(f"{path} is not valid YAML{where}") from None
    deployments = data.get("deployments") if isinstance(data, dict) else None
    if not isinstance(deployments, list) or not deployments:
        raise DeploymentError(f"{path} has no 'deployments' list")
    for spec in deployments:
        if not isinstance(spec, dict) or not spec.get("name") or not spec.get("entrypoint"):
            raise DeploymentError(f"{path}: every deployment needs a name and an entrypoint (file.py:flow)")
        unknown = sorted(set(spec) - set(KNOWN_KEYS))
        if unknown:
            raise DeploymentError(f"{path}: deployment {spec['name']!r} has an unknown key {unknown[0]!r}")
    return deployments


def _schedules(spec: dict) -> list:
    from prefect.schedules import Cron, Interval, RRule

    entries = spec.get("schedules")
    if entries is None and spec.get("schedule"):
        entries = [spec["schedule"]]
    out = []
    for entry in entries or []:
        common = {k: entry[k] for k in ("timezone", "active", "parameters", "slug") if entry.get(k) is not None}
        if entry.get("cron"):
            out.append(Cron(entry["cron"], day_or=entry.get("day_or", True), **common))
        elif entry.get("interval") is not None:
            out.append(Interval(float(entry["interval"]), anchor_date=entry.get("anchor_date"), **common))
        elif entry.get("rrule"):
            common.pop("timezone", None)
            out.append(RRule(entry["rrule"], timezone=entry.get("timezone"), **common))
        else:
            raise DeploymentError(f"deployment {spec['name']!r}: a schedule needs cron, interval or rrule")
    return out


def build_deployments(specs: list[dict], names: list[str] | None = None, parameters: dict | None = None,
                      schedules: bool = True) -> list:
    """RunnerDeployments of ``specs`` (those named in ``names``, default all), with ``parameters`` overriding the
    file's for every deployment whose flow takes them. Call with the project root as working directory."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.flows import load_flow_from_entrypoint

    chosen = [s for s in specs if not names or s["name"] in names]
    if names:
        unknown = sorted(set(names) - {s["name"] for s in specs})
        if unknown:
            raise DeploymentError(f"no deployment named {unknown[0]!r} (known: "
                                  f"{', '.join(s['name'] for s in specs)})")
    out = []
    for spec in chosen:
        flow = load_flow_from_entrypoint(spec["entrypoint"])
        accepted = set(flow.parameters.properties) if getattr(flow, "parameters", None) else set()
        params = dict(spec.get("parameters") or {})
        params.update({k: v for k, v in (parameters or {}).items() if k in accepted})
        kwargs: dict[str, Any] = {k: spec[k] for k in ("description", "tags", "version", "concurrency_limit",
                                                        "enforce_parameter_schema", "paused") if k in spec}
        out.append(RunnerDeployment.from_entrypoint(spec["entrypoint"], spec["name"], parameters=params,
                                                    schedules=_schedules(spec) if schedules else None, **kwargs))
    return out


def serve(path: str | None = None, names: list[str] | None = None, parameters: dict | None = None,
          schedules: bool = True, limit: int | None = None) -> None:
    """Serve the deployments until interrupted (blocks)."""
    from prefect import serve as prefect_serve

    specs = load_deployments(Path(path).resolve() if path else None)  # relative to the caller's directory
    os.chdir(project_root())
    deployments = build_deployments(specs, names, parameters, schedules)
    prefect_serve(*deployments, limit=limit, print_starting_message=True)


__all__ = ["serve", "build_deployments", "load_deployments", "project_root", "DeploymentError"]

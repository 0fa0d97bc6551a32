"""Issue 14: one stage, one module; the run layout only in storage/.

The STAGES table (tasks/stages.py) is checked against the task modules (every stage's task lives in
``tasks/<stage>.py`` and is named after it, and every task there is in the table) and against what a run writes
and logs (its manifests, its ``computing <stage>`` lines, its Prefect task runs). A grep of the syntax tree finds
no run-layout path literal outside storage/.
"""

from __future__ import annotations

import ast
import importlib
import logging
import pkgutil
import re
from pathlib import Path

import pytest

from conftest import write_model_dir

ROOT = Path(__file__).resolve().parent.parent


def _tasks_in(module) -> list:
    from prefect import Task

    return [obj for obj in vars(module).values()
            if isinstance(obj, Task) and getattr(obj.fn, "__module__", None) == module.__name__]


def test_every_stage_lives_in_its_own_module():
    from tasks.stages import STAGES

    assert len({s.name for s in STAGES}) == len(STAGES)
    for stage in STAGES:
        path = ROOT / "tasks" / (stage.name.replace("-", "_") + ".py")
        assert path.is_file(), f"stage {stage.name} has no {path.relative_to(ROOT)}"
        objects = stage.task_objects()
        assert objects, stage
        for task in objects:
            assert task.name == stage.name, (task.name, stage.name)
            assert task.fn.__module__ == stage.module_name, (task.fn.__module__, stage.module_name)
        assert sorted(t.name for t in _tasks_in(stage.module())) == [stage.name] * len(objects)


def test_every_task_module_is_in_the_table():
    import tasks
    from tasks.stages import STAGE_BY_NAME

    for info in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{info.name}")
        for task in _tasks_in(module):
            assert task.name in STAGE_BY_NAME, f"task {task.name} in {module.__name__} is not in STAGES"
            stage = STAGE_BY_NAME[task.name]
            assert module.__name__ == stage.module_name
            assert task in stage.task_objects(), f"{module.__name__}: {task.name} task not listed in STAGES"


def test_content_keys_take_the_table_s_code_version(monkeypatch):
    from tasks import stages
    from tasks.common import stage_key

    before = stage_key("solve", point=1)
    assert stage_key("solve", point=1) == before
    monkeypatch.setitem(stages.STAGE_BY_NAME, "solve",
                        stages.Stage("solve", "999", (), (), ("solve_task",)))
    assert stage_key("solve", point=1) != before
    with pytest.raises(KeyError):
        stage_key("plan", point=1)  # plan stores nothing: it has no content key


@pytest.mark.parametrize("layout, mode", [("per-point", "sequential"), ("global", "parallel")])
def test_a_run_writes_and_logs_the_table_s_stages(pipeline_env, caplog, layout, mode):
    """Every stage a run writes a manifest for, logs a ``computing`` line for, or runs a Prefect task of, is a stage
    of the table (in its module), and the table's stages with content keys are the manifests' stages."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.compress import compress_flow
    from tasks.stages import STAGE_BY_NAME

    src = write_model_dir(pipeline_env / "src", family="llama-tied", seed=3)
    run_dir = pipeline_env / "run"
    with caplog.at_level(logging.INFO):
        result = compress_flow(model=str(src), run_dir=str(run_dir), ratio=0.25, method="pca", mode=mode,
                               layout=layout, calib_samples=8, calib_seqlen=16, seed=1, progress=False,
                               ppl=True, ppl_ctx=16, ppl_max_windows=2, mlflow=True,
                               config_overrides={"mlp_ratio": 0.25})
    manifests = {p.name.removesuffix(".json") for p in (run_dir / "stages").iterdir()}
    logged = set(re.findall(r"computing ([a-z-]+)[\[ ]", caplog.text))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[result["flow_run_id"]])))
    ran = {run.name.rpartition("-")[0] for run in runs}
    expected = {"inspect", "calibration", "capture", "mlp", "absorb", "export", "evaluate"}
    expected |= {"pool"} if layout == "global" else set()
    assert manifests | {"solve"} == expected | {"solve"}, manifests  # a basis's record is its own marker
    assert logged == expected | {"solve", "register"}, logged
    assert ran == expected | {"solve", "source", "plan", "lineage", "register"}, ran
    for name in manifests | logged | ran:
        assert name in STAGE_BY_NAME, name
    for name in manifests | logged - {"register"}:
        assert STAGE_BY_NAME[name].code_version is not None, name


# --- the run layout lives in storage/ -----------------------------------------------------------------------------
def _layout_names() -> tuple[set[str], set[str]]:
    from storage import rundir as layout

    files = {layout.RECIPE, layout.SOURCE, layout.CALIBRATION, layout.CALIBRATION_IDS, layout.ENDS, layout.LINEAGE,
             layout.TIMINGS, layout.MLFLOW, layout.ACTIVATIONS, layout.TASK_RECORDS}
    dirs = {layout.INSPECT, layout.BASES, layout.LAYERS, layout.MODEL, layout.EVAL, layout.STAGES, layout.MLP,
            layout.CALIBRATION_IDS.split("/")[0]}
    return files, dirs


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def layout_literals(path: Path) -> list[str]:
    """``line: literal`` of every run-layout path written as a literal in ``path``: a string that is a layout
    file's name or starts with a layout folder (``"model/..."``), or a path join with one (``x / "model"``)."""
    files, dirs = _layout_names()
    tree = ast.parse(path.read_text())
    docstrings = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in files or any(node.value.startswith(d + "/") for d in dirs):
                found.append(f"{node.lineno}: {node.value!r}")
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
              and node.right.value in files | dirs):
            found.append(f"{node.lineno}: / {node.right.value!r}")
    return found


def test_the_run_layout_is_spelled_only_in_storage():
    offenders = []
    for folder in ("dotresize", "tasks", "flows", "benchmarks", "deployments"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            offenders += [f"{path.relative_to(ROOT)}:{hit}" for hit in layout_literals(path)]
    assert not offenders, "run-layout paths outside storage/ (use storage.rundir):\n" + "\n".join(offenders)


def test_the_layout_grep_finds_a_literal(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Docs may say model/ and lineage.json."""\n'
                      'def f(run):\n    """lineage.json in a docstring is prose."""\n'
                      '    return run / "model", "stages/export.json", "lineage.json", "the model"\n')
    assert layout_literals(sample) == ["4: / 'model'", "4: 'stages/export.json'", "4: 'lineage.json'"]

"""The calibration stage: the calibration windows tokenised with the source's tokenizer and sampled."""

from __future__ import annotations

import torch

from storage import RunDir
from storage import rundir as layout

from .cache import stage_task
from .common import Probe, logger, manifest_probe, run_probed, stage_key
from .inspect import load_inspected

#: the stage (its log label, manifests and Prefect task name; tasks/stages.py)
NAME = "calibration"


def calibration_probe(run_url: str, source: dict, calib: dict, **_) -> Probe:
    key = stage_key(NAME, source=source["digest"], text=calib["text_sha256"], data=calib["data"],
                    samples=calib["samples"], seqlen=calib["seqlen"], seed=calib["seed"])
    return manifest_probe(RunDir(run_url), NAME, None, key)


@stage_task(calibration_probe, name=NAME)
def calibration_task(run_url: str, source: dict, calib: dict, inspect: dict, hidden_size: int | None = None) -> dict:
    """Tokenise and sample the calibration windows with the source's tokenizer (as the inspect stage stored it:
    a GGUF tokenizer is converted once per run); store the ids and calibration.json (a set of fewer tokens than
    ``hidden_size`` is recorded and logged with a warning)."""
    probe = calibration_probe(run_url, source, calib)
    run = probe.run

    def compute() -> dict:
        from dotresize.data import calibration_set

        _, _, tokenizer = load_inspected(run, inspect)
        calibration = calibration_set(tokenizer, calib["data"], samples=calib["samples"], seqlen=calib["seqlen"],
                                      seed=calib["seed"])
        meta = calibration.meta()
        if hidden_size is not None:
            from dotresize.api import check_calibration

            warning = check_calibration(calibration.input_ids, hidden_size)
            if warning:
                logger().warning(warning)
                meta["warning"] = warning
        ids_sha = run.save_tensors(layout.CALIBRATION_IDS,
                                   {"input_ids": calibration.input_ids.to(torch.int64).contiguous()})
        meta_sha = run.write_json(layout.CALIBRATION, meta)
        return {"files": {layout.CALIBRATION_IDS: ids_sha, layout.CALIBRATION: meta_sha},
                "digest": meta["input_ids_sha256"], "tokens": meta["tokens"],
                "shapes": {"input_ids": list(calibration.input_ids.shape)}, "meta": meta}

    return run_probed(probe, compute)


__all__ = ["calibration_task"]

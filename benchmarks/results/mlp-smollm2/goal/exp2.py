import sys, json, time
sys.path.insert(0, "/work/main")
from pathlib import Path
from benchmarks.mlp import Protocol, ModelState, cached_stats, RowSpec, run_row
from dotresize.mlp import MlpOptions
samples = int(sys.argv[1]); rows = json.loads(sys.argv[2])
state = ModelState(Protocol(calib_samples=samples, heldout_samples=32))
cal, held = cached_stats(state, Path("/tmp/dotresize-mlp"))
for r in rows:
    mode = r.pop("mode", "parallel"); width = r.pop("width", 1016)
    spec = RowSpec("x", json.dumps(r), mode, width, MlpOptions(**r))
    row = run_row(state, spec, cal, held)
    print(json.dumps({"samples": samples, "mode": mode, "width": width, **r, "ppl": round(row["ppl"], 3),
                      "params": row["params"], "err_cal": round(row["output_error_cal"], 4),
                      "err_held": round(row["output_error_heldout"], 4)}), flush=True)

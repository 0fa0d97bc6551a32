"""Scratch: in-memory API rows for the 0.80x stock goal. argv: json list of row dicts."""
import sys, json, time, os, copy
sys.path.insert(0, "/work/main")
import torch
from dotresize import CompressionConfig, compress, count_parameters
from dotresize.config import MlpOptions
from dotresize.data import calibration_set, load_text, tokenize
from dotresize.sources import load_model, resolve_source
from dotresize.evaluation.perplexity import perplexity
src = resolve_source("smollm2-135m-instruct")
rows = json.loads(sys.argv[1])
for row in rows:
    model, tok = load_model(src)
    dense = count_parameters(model)
    cal = calibration_set(tok, "wikitext2", samples=row.pop("samples", 64), seqlen=256, seed=42)
    mlp = row.pop("mlp", {})
    config = CompressionConfig(**row, mlp=MlpOptions(**mlp)).validate()
    t0 = time.time()
    compressed, report = compress(model, cal.input_ids, config, progress=False)
    test = tokenize(tok, load_text("wikitext2-test").text)
    ppl = perplexity(compressed, test, ctx=256, max_windows=100, batch_size=4, progress=False)["ppl"]
    print(json.dumps({"row": {**row, "mlp": mlp, "samples": cal.input_ids.shape[0]}, "params": report.parameters_after,
                      "x": round(report.parameters_after / dense, 4), "ppl": round(ppl, 3),
                      "s": round(time.time() - t0)}), flush=True)
    del model, compressed

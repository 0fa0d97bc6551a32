"""Scratch: does more calibration data / a dense target lift lsq at width 1016 (0.7996x)?"""
import sys, time, json, torch
sys.path.insert(0, "/work/main")
from benchmarks.mlp import Protocol, ModelState, capture_parallel, apply_reduction, layer_inputs
from dotresize.mlp import MlpOptions, MlpStatsAccumulator, reduce_mlp, select_keep, ridge_solve, complement
from dotresize import count_parameters
from dotresize.evaluation.perplexity import perplexity

W = 1016
samples = int(sys.argv[1]); modes = sys.argv[2].split(","); ridge = float(sys.argv[3]) if len(sys.argv) > 3 else 0.1
p = Protocol(calib_samples=samples, heldout_samples=4)
state = ModelState(p)
opts = MlpOptions(method="lsq", ridge=ridge)

def ppl():
    r = perplexity(state.model, state.test_ids, ctx=p.ctx, max_windows=p.max_windows, batch_size=p.eval_batch_size, progress=False)
    return r["ppl"]

def emit(label, t0):
    print(json.dumps({"label": label, "samples": samples, "ridge": ridge, "params": count_parameters(state.model),
                      "ppl": round(ppl(), 3), "solve_s": round(time.time() - t0, 1)}), flush=True)

if "parallel" in modes:
    t0 = time.time(); cal = capture_parallel(state, state.calibration)
    for layer, s in zip(state.layers, cal):
        apply_reduction(layer.mlp, reduce_mlp(s, layer.mlp.down_proj.weight, W, opts))
    emit("parallel lsq", t0); state.restore(); del cal

@torch.no_grad()
def seq(dense_target: bool):
    xs, kw = layer_inputs(state)
    xd = [x.clone() for x in xs]  # dense stream
    for i, layer in enumerate(state.layers):
        down = layer.mlp.down_proj
        I = down.in_features
        acc = MlpStatsAccumulator(I, layer=i)
        cross = torch.zeros(I, I, dtype=torch.float64)  # E[h_dense h_red^T]
        hold = {}
        hd = down.register_forward_pre_hook(lambda m, a: hold.__setitem__("h", a[0].reshape(-1, I).double()))
        for x, xdd, k in zip(xs, xd, kw):
            layer(x, **k); hr = hold["h"]; acc.add(hr)
            if dense_target:
                layer(xdd, **k); hdd = hold["h"]; cross.addmm_(hdd.T, hr)
        hd.remove()
        stats = acc.finalize()
        red = reduce_mlp(stats, down.weight, W, opts)
        if dense_target:
            K = red.keep
            g_kk = stats.gram[K][:, K]
            B = ridge_solve(g_kk, cross[:, K].T.contiguous(), ridge)  # m x I : W' = W B^T
            Wn = (down.weight.double() @ B.T).float()
            orig = (layer.mlp.gate_proj, layer.mlp.up_proj, down)
            if dense_target:
                xd = [layer(x, **k)[0] if isinstance(layer(x, **k), tuple) else layer(x, **k) for x, k in zip(xd, kw)]
            apply_reduction(layer.mlp, red)
            with torch.no_grad(): layer.mlp.down_proj.weight.copy_(Wn)
        else:
            apply_reduction(layer.mlp, red)
        out = [layer(x, **k) for x, k in zip(xs, kw)]
        xs = [o[0] if isinstance(o, tuple) else o for o in out]

for mode in modes:
    if mode == "sequential":
        t0 = time.time(); seq(False); emit("sequential lsq", t0); state.restore()
    if mode == "dense":
        t0 = time.time(); seq(True); emit("sequential lsq dense-target", t0); state.restore()

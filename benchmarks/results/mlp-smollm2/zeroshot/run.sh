#!/bin/bash
# usage: ./run.sh MODEL_DIR... (run from the output directory; one JSON per model and task group)
# full zero-shot sets, bfloat16 (log-softmax float32), task-major so every finished group is a complete column;
# run for /tmp/zs/mlp-stock-0.80 (the recipe's export) and /tmp/zs/mlp-stock-0.90 (compress-0.90.json)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DOTRESIZE_DATA_DIR=/work/shared/data PYTHONPATH=/work/main OMP_WAIT_POLICY=PASSIVE
for group in piqa copa,openbookqa,winogrande arc_challenge siqa arc_easy boolq lambada; do
  for m in "$@"; do
    n=$(basename $m); g=${group//,/+}
    [ -s $n-$g.json ] && continue
    echo "=== $n $g start $(date +%s) $(date)"
    /usr/bin/time -v /work/main/.venv/bin/python -m flows.cli -q evaluate $m --tasks $group --dtype bfloat16 --batch-size 16 --no-mlflow --json > $n-$g.json.tmp 2> $n-$g.err && mv $n-$g.json.tmp $n-$g.json
    echo "=== $n $g rc=$? end $(date +%s) $(date)"
  done
done
echo ALLDONE

#!/bin/bash
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DOTRESIZE_DATA_DIR=/work/shared/data PYTHONPATH=/work/main OMP_WAIT_POLICY=PASSIVE
cd /tmp/zs
for group in piqa copa,openbookqa,winogrande arc_challenge siqa arc_easy boolq lambada; do
  for m in /tmp/zs/mlp-stock-0.90; do
    n=$(basename $m); g=${group//,/+}
    [ -s $n-$g.json ] && continue
    echo "=== $n $g start $(date +%s) $(date)"
    /usr/bin/time -v /work/main/.venv/bin/python -m flows.cli -q evaluate $m --tasks $group --dtype bfloat16 --batch-size 16 --no-mlflow --json > $n-$g.json.tmp 2> $n-$g.err && mv $n-$g.json.tmp $n-$g.json
    echo "=== $n $g rc=$? end $(date +%s) $(date)"
  done
done
echo ALLDONE

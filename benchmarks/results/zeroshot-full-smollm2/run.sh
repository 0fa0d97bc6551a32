#!/bin/bash
# usage: REPO=/path/to/dotresize OUT=/tmp/zs DOT=/path/dot-20 PCA=/path/pca-20 ./run.sh (one JSON per model and task group)
# full zero-shot sets, bfloat16 (log-softmax float32), task-major so every finished group is a complete column
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DOTRESIZE_DATA_DIR=${DOTRESIZE_DATA_DIR:-$REPO/../shared/data} PYTHONPATH=$REPO
cd "$OUT"
for group in piqa copa,openbookqa,winogrande arc_challenge siqa arc_easy boolq lambada; do
  for m in smollm2-135m-instruct $DOT $PCA; do
    n=$(basename $m); g=${group//,/+}
    [ -s $n-$g.json ] && continue
    echo "=== $n $g start $(date +%s) $(date)"
    /usr/bin/time -v $REPO/.venv/bin/python -m flows.cli -q evaluate $m --tasks $group --dtype bfloat16 --batch-size 16 --json > $n-$g.json.tmp 2> $n-$g.err && mv $n-$g.json.tmp $n-$g.json
    echo "=== $n $g rc=$? end $(date +%s) $(date)"
  done
done
echo ALLDONE

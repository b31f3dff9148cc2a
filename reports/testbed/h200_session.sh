#!/usr/bin/env bash
# How the testbed's GPU records of session 19 on were made: one H200 lent for at most 10 minutes a call,
# held while calls follow each other (the tool library's `device`), wheels carried in .whl/, results
# returned through $OUT. Kept beside the records it made; nothing reads it.
#
#   bash reports/testbed/h200_session.sh start    # frozen CLIP remade, datasets, control launched
#   STOP_AT=50 bash reports/testbed/h200_session.sh poll   # wait for cells; results to $OUT
#   bash reports/testbed/h200_session.sh profile  # (issue 20) inference at batch 1 and 64, profiled
#
# The wheels (the device image has torch but not these), fetched here with the device README's pip download
# command (--python-version 3.12, manylinux platforms) into .whl/: open_clip_torch==3.3.0 pycocotools==2.0.11
# optuna==5.0.0 submitit==1.5.4 ftfy wcwidth alembic sqlalchemy colorlog mako; carry [".whl"].
#
# The frozen small CLIP (TESTBED §3) is remade at each start by deterministic GPU pretraining of the gpu
# profile's recipe (ehin.pretrain_clip --freeze): its file name carries its sha256, which every record
# that loads it stores. Session 19 ran two at once in two caches (RUNS="a b"): one name,
# clip-tiny-rn-2195732df831-939486c5.pt. A start that makes another name stops before any cell runs.
# The control resumes from the committed store: cells already there are not run again.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" /tmp/p
export PYTHONUNBUFFERED=1 EHIN_CACHE=/tmp/ehc TQDM_DISABLE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
RECIPE="synthetic:scenes=cluttered,scene_on_black=1.0,captions=referring,steps=1200,n_train=16000"
SETTING=(--set eval.every=5 --set train.channels_last=true --set train.fused_adamw=true
         --set train.epochs=20 --set synthetic.images=7200)
RESULTS=/tmp/p/r
FROZEN=clip-tiny-rn-2195732df831-939486c5.pt
STORE=reports/testbed/control-gpu-h200clip

case "${1:-}" in
start)
  t0=$(date +%s)
  for c in ${RUNS:-a}; do
    EHIN_CACHE=/tmp/clip-$c python3 -m ehin.pretrain_clip --profile gpu --workers 12 --freeze /tmp/frozen-$c \
      --set backbone.pretrained=$RECIPE > /tmp/p/clip-$c.log 2>&1 &
  done
  # the control's datasets meanwhile (CPU), one process per variant
  for v in refcoco refcoco+ refcocog referit; do
    python3 -c "from ehin.config import load_config; from ehin.data import prepare_dataset
prepare_dataset(load_config(profile='gpu', overrides=['data.dataset=synth-$v', 'synthetic.images=7200']), progress=False)" \
      > /tmp/p/data-$v.log 2>&1 &
  done
  wait
  echo "clip and datasets: $(( $(date +%s) - t0 )) s"
  for f in /tmp/p/clip-*.log /tmp/p/data-*.log; do
    echo "== $f"; tr '\r' '\n' < "$f" | grep -a -v "it/s\|^ *$" | tail -n 4
  done
  for c in ${RUNS:-a}; do
    name=$(basename "$(ls /tmp/frozen-$c/*.pt)")
    [ "$name" = "$FROZEN" ] && echo "run $c froze $name, as pinned" || { echo "run $c froze $name, not $FROZEN: stop"; exit 3; }
  done
  mkdir -p frozen && cp /tmp/frozen-a/* frozen/
  cp /tmp/frozen-a/*.json /tmp/p/clip-a.log "$OUT/"
  mkdir -p $RESULTS && cp -r $STORE/store.jsonl $STORE/per_expression $RESULTS/
  setsid nohup python3 -m bench.testbed --profile gpu --seeds 10 --set backbone.pretrained=frozen/$name "${SETTING[@]}" \
    --set train.compile=reduce-overhead --results $RESULTS --name control --out /tmp/p/rep \
    --jobs ${JOBS:-30} --mps --compile-wait 240 > /tmp/p/control.log 2>&1 < /dev/null &
  echo "control launched with frozen/$name after $(( $(date +%s) - t0 )) s"
  ;;
poll)
  limit=${LIMIT:-560} t0=$(date +%s)
  while :; do
    n=$(cat $RESULTS/store.jsonl 2>/dev/null | wc -l)
    [ "$n" -ge "${STOP_AT:-50}" ] && break
    [ $(( $(date +%s) - t0 )) -ge "$limit" ] && break
    sleep 10
  done
  echo "$n cells stored after $(( $(date +%s) - t0 )) s"
  grep -a -v "it/s" /tmp/p/control.log | tail -n 15
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > /tmp/p/util.txt
  tar czf "$OUT/control.tgz" -C /tmp/p r/store.jsonl r/per_expression util.txt control.log 2>/dev/null
  ;;
profile)  # issue 20: where batch-64 inference spends its time (tables and gzipped traces under $OUT/t)
  timeout ${LIMIT:-300} python3 -m bench.perf --size paper --configs ehin --skip train,stage2 --amp --channels-last \
    --fold-bn --trace "$OUT/t" --out "$OUT/h200_bf16_cl_foldbn_infer_profile.json" 2>&1 | grep -a -v "it/s" | tail -n 8
  head -n 40 "$OUT/t/ehin_infer_bs64.txt"
  ;;
*) echo "usage: $0 start|poll|profile"; exit 2 ;;
esac

#!/usr/bin/env bash
# How the GPU records of session 19 on were made: one H200 lent for at most 10 minutes a call, held while
# calls follow each other (the tool library's `device`), results returned through $OUT, nothing kept
# between sittings. Kept beside the records it made; nothing reads it.
#
#   bash reports/h200_session.sh start     # frozen CLIP, datasets, then $TASKS in one detached process
#   bash reports/h200_session.sh poll      # wait for the tasks (at most $LIMIT s); new records to $OUT
#   UNTIL_S=160 LIMIT=150 bash reports/h200_session.sh poll   # past the deadline, while device time is left
#   bash reports/h200_session.sh go        # start, then poll in the same call (LIMIT 570 counted from the start)
#   TABLE_JOBS=8 TABLE_JOBS_H100=6 ... go   # the wave's size by the card the call got (either, naming nvidia-h200)
#   TASKS=... bash reports/h200_session.sh more   # once they are done, more tasks on the same machine and stores, then poll
#   bash reports/h200_session.sh salvage   # before the machine goes: the labels of chains still in stage 2, handed over
#   FIRST=3 bash reports/h200_session.sh handback   # the parts of a handover (task handover) that poll did not return
#   PERF_ARGS="..." NAME=... bash reports/h200_session.sh perf    # (issue 20) bench.perf (TRACE=1: profiled); or TASKS="... infer" after the cells
#
# Bring a sitting back from the last poll's $OUT/stores.tgz: its g/store.jsonl replaces
# reports/gpu/store/store.jsonl (it holds the committed lines first), and its g/per_expression/* are copied
# over reports/gpu/store/per_expression/, overwriting (a rerun of a failed cell rewrites the file the failed
# attempt left: session 28); rr/ and cl/ likewise for the testbed's stores, d2/ (task ddp2) for
# reports/gpu/store-ranks2/. tests/test_store.py checks that the files and the records agree. The committed lines
# live in sealed segments (store-001.jsonl, ...; bench.store.ResultStore.seal) once store.jsonl nears 1 MiB, so
# before committing a store grown past that: python -c "from bench.store import ResultStore as S; S('reports/gpu/store').seal()"
#
# TASKS (default "table10 tables"; session 27 ran the rerun), one after another, each resuming from its
# committed store, so a sitting that ends first loses only the cells still running:
#   table10  Table 10's inference-time cells, one at a time on an otherwise idle GPU -> reports/gpu/store/
#   rerun    the positive control's cells run again, seeds 0..RERUN_SEEDS-1 (default 5), for TESTBED §2.4's
#            run-to-run spread -> reports/testbed/control-gpu-clip1-rerun/ (session 21's, of the profile
#            before train.grad_clip, is control-gpu-h200clip-rerun/)
#   tables   the paper's tables ($TABLES: all but Tables 10, 2 and 8; TABLE_ROWS: only these rows, bench.run --rows),
#            TABLE_JOBS cells at once (default 14). Packed,
#            the GPU does about 12,000 TRIS-like training images a second in all, 16 cells or 20 (session 25's
#            control: 20 cells of 21,500 refs x 20 epochs at 34-37 s an epoch each) and about half as many
#            EHIN ones (reports/perf/h200_gpu_ehin_tris_procs16_mps_ro.json), so an EHIN cell's share is about
#            70 s (`python -m bench.estimate --profile gpu`), plus its compiled first epoch and evaluations.
#            Measured: 14 packed took 17 min 37 s, 17 min 34 s and 17 min 48 s (sessions 26, 28, 29; cells
#            771-1,009 s each), the GPU at 100 % and the 16 cores 84 % busy. 16 at once (one a core; --jobs 16
#            keeps train.threads 1, no record changed): each cell took 1.17-1.18 x its time in a wave of 14,
#            the cores 98 % busy (session 30; its first 8 ended at 15.5-18.1 min, the other 8 were lost with
#            the machine), so a wave is about 21 min and ends about 5 minutes before the machine goes. Rows
#            with more BP layers, K = 9 or small batches cost more; Table 2's chains add CPU pseudo-labels and
#            stage 2, so it has its own task -> reports/gpu/store/
#   table2   Table 2 alone, TABLE2_JOBS cells at once (default 6): a Stage-2 chain trains stage 1 (or waits for
#            its Stage-1 cell to), labels its 20,337 train refs with the dense CRF on the CPU in PSEUDO_WORKERS
#            processes (default 12; pseudo.workers, hashed at 2 whatever it is) and trains stage 2, all within
#            the sitting or lost -> reports/gpu/store/; TABLE2_ROWS and TABLE2_SEEDS (bench.run --rows, --seeds)
#            pick some.
#            Measured on an H100 (session 44, seed 0 of synth-refcoco+'s TRIS-like and EHIN rows, one chain
#            each): stage 1, the two packed, 570 and 646 s a cell (26 and 30 s an epoch); the labels, 35 of 80
#            chunks of 256 refs in 6 min 32 s with 2 processes a chain (11.5 s a chunk, both chains at once:
#            about 16 min a chain) and 2.5 s a chunk with 14 (about 3.5 min). Session 45 (an H100, synth-refcoco,
#            both methods' chains): stage 1 425 and 499 s a cell (19.6 and 23.3 s an epoch); the TRIS-like chain's
#            Stage-2 cell 835 s (labels 155 s with 12 processes, stage 2 668 s: 15 epochs of 39 s, eager), the
#            other chain's Stage-2 cell started 75 s later and had not ended 870 s after it started. A chain's
#            Stage-2 cell starts when its stage 1 is done, so TABLE2_WAVE_S is what labels and stage 2 need, not a
#            wave (session 44's sitting, run with the tables' 1,320 s, started no Stage-2 cell). Session 48 (an H100,
#            synth-refcocog, stage 2 alone on handed-over labels): compiled (train.compile, since d311adb), two
#            trainings packed took 327 and 342 s a cell (20 s an epoch, the first 66 s with compilation), one alone
#            304 s (17.6 s an epoch). So 600 s by default: session 45's labels (155 s), session 48's stage 2 (342 s),
#            and a fifth more for labels made at once by several chains
#            Session 50 (an H100, two EHIN chains whole, TABLE2_JOBS=2 SITTING_S=1600): stage 1 466 and 470 s, labels
#            279 and 302 s (12 processes each, at once), stage 2 457 and 438 s (compiled, 28 s an epoch): 22 min for
#            the task after a 147 s start, device time 1,567 s: two whole chains fit a sitting (three: not tried)
#            Session 62 (an H100, synth-referit's two chains at seed 0, TABLE2_JOBS=2 SITTING_S=1500, 116 s start): stage 1
#            ended 11 min (TRIS-like) and 15 min (EHIN) after the launch, both chains' labels (85 chunks each, 12
#            processes a chain) were made 18.4 min after it, and neither stage 2 had ended 24 min after it, when the
#            device time was spent (1,770 s): nothing stored. Two synth-referit chains do not fit a sitting; run them one
#            a sitting (TABLE2_JOBS=1 PSEUDO_WORKERS=14), or as session 46's handover across two
#            Session 64 (an H100 for a call naming nvidia-h200, 68 s start, 1,124 s of device time left): seed 2's
#            Stage-1 trainings of the TRIS-like synth-referit, synth-refcoco and synth-refcocog (umd) rows and EHIN's
#            synth-referit row, TABLE2_JOBS=4 TABLE2_WAVE_S=150 SITTING_S=910: 361, 421, 382 and 456 s a cell, each
#            at most 7 % over the slowest cell of its row stored before; 7 cells stored 7 min 56 s after the launch,
#            678 s of device time for the call
#            Session 65 (an H100 for a call naming nvidia-h200, 107 s start, 1,439 s left): the TRIS-like synth-referit
#            chain at seed 0 alone, TABLE2_JOBS=1 PSEUDO_WORKERS=14 SITTING_S=1240: stage 1 771 s (36 s an epoch, twice
#            the stored cell's, the GPU idle at times: a slow machine), labels 244 s, stage 2 still compiling when 122 s
#            of device time were left; nothing stored. Its labels could have been kept by `salvage` (below)
#   handover (session 46) the chains of HANDOVER_ROWS (default: the Stage-2 twins of TABLE2_ROWS) whose stage 1 the
#            table2 task trained: their labels, in one process with PSEUDO_WORKERS CRF processes (default 14), and
#            no stage 2 (bench.run --hand-over) -> $OUT/handover/, stage 1's result.json and the labels, under their
#            paths below the store; kept here in handover/ (git-ignored) and carried to a later sitting, whose
#            start copies them into its store, where those chains' Stage-2 cells train stage 2 alone on those labels
#            (ehin.two_stage: stage 1 handed over without its checkpoint). A chain's parts then fit two sittings
#            when it does not fit one: TASKS="table2 handover" with TABLE2_ROWS the Stage-1 rows, then
#            TASKS=table2 with the Stage-2 rows, carrying handover, and TABLE2_WAVE_S what stage 2 alone needs
#            (session 48's, compiled: 342 s). HANDOVER_WAVE_S (200) is what a chain's labels need (session 45: 155 s
#            with 12 processes, before the CRF built its lattices once a ref)
#   clip     session 21's pre-registered remedy (reports/testbed/README.md, last section): the control with
#            train.grad_clip=1.0 on synth-refcoco+ and synth-refcocog (umd), seeds 0-9 (20 cells)
#            -> reports/testbed/control-gpu-clip1/
#   control  the rule adopted it (session 22): the control's other 30 cells with train.grad_clip=1.0 (the
#            gpu profile's since), same store -> reports/testbed/control-gpu-clip1/
#   infer    (issue 20) bench.perf of inference alone, $PERF_ARGS (default $INFER_ARGS: batch 1 and 64 at the paper size,
#            compiled with reduce-overhead) -> reports/perf/$NAME.json, through poll (which returns h200_*.json);
#            after the cells, on an idle GPU
#   perf     bench.perf of the gpu profile's EHIN and TRIS-like stage-1 training, 16 processes under MPS
#            with reduce-overhead (what a packed cell costs) -> reports/perf/, through poll
#   stage2   bench.perf of the gpu profile's stage-2 step alone (channels-last, fused Adam), eager and with
#            --compile-train reduce-overhead, at most 150 s each -> /tmp/p/h200_gpu_stage2_{eager,ro}.json (the
#            names poll returns; the device is in the file): stage 2's levers (session 45). Tasks run one after
#            another, so TASKS="stage2 table2" starts the chains up to 5 minutes later
#   ddp2     (issue 20; a sitting of kind nvidia-h200-x2, not run yet) bench.perf --ddp 2 at the paper size, both
#            stages, bf16 + channels-last + fused AdamW (per-step `scaling` of two GPUs over one) -> reports/perf/,
#            then Table 5's full loss, seeds 0..4, each cell one job of two ranks on both GPUs (bench.run --ranks 2;
#            eager and without MPS: CUDA graphs and MPS with NCCL's collectives are untested here; neither is
#            hashed, so the cells are the stored ones) -> reports/gpu/store-ranks2/, compared by seed with the one-GPU cells:
#            python -m bench.check --against reports/gpu/store --tables table5 --rows bg+fg+cl --results reports/gpu/store-ranks2
# The cells run packed on the GPU under MPS with train.compile=reduce-overhead (neither is hashed).
# A machine goes back 30 s after a call ends unless the next call comes (session 24 lost a wave of 10 cells
# so: its next poll came later; the new machine it started held nothing), and after 30 minutes held in any
# case (about 90 s of them pass before `start` runs, 183 s in session 30); a session has 30 device-minutes,
# starts and failed starts (about 90 s each) included, and none is started with less than 4 left. So: one poll
# right after another, each with a LIMIT near 580, no pause between them (session 30 lost 8 cells of a wave so),
# poll returning before the machine goes, SITTING_S (1650) after start began; with less device time than 1,800 s
# left at `start`, set SITTING_S to that less 200. A machine can also go with no pause at all (session 31: the
# second poll, sent at once, found a new one; 16 cells lost; session 39 too), hence `go`, whose first poll waits in
# the start's own call; with under about 1,350 s left no wave of 14 fits,
# and a small one does: SITTING_S=740 TABLE_JOBS=5 TABLE_WAVE_S=560 TASKS=tables ran 5 cells in 8 min 44 s
# (each 0.52 x its time in a wave of 14, so about 1.75 device-minutes a cell against 1.26). On an H100, 5 cells of
# Table 9's referit K=9 and Table 8's K=1 (TABLE_JOBS=5 TABLE_WAVE_S=500 SITTING_S=760) took 11 min 35 s, 509-666 s
# a cell (session 52; the poll past the deadline: UNTIL_S). A start that remakes the frozen CLIP takes about 210 s,
# one that carries it about 90. A cell still running when the machine goes is lost, so a task starts cells only
# while a wave of them can still end (bench.run --start-within): TABLE_WAVE_S
# (1320) for tables, TABLE2_WAVE_S (600) for table2's Stage-2 cells (above), CONTROL_WAVE_S (1080) for the
# control's tasks (20 TRIS-like cells packed took 16 min 54 s in session 25, 25 took 19 min 19 s in session 21),
# TABLE10_WAVE_S (60) for Table 10's timing cells; a task with no such time left is skipped.
#
# Waves of 14 by default (TABLE_JOBS, was 16) and polls of up to 580 s (LIMIT, was 560): a wave of 14 ends
# within the two polls after `start`, one of 16 needs a third call, and four of the nine gaps between calls in
# sessions 31-33 lost the machine. With about 1,350 s left, SITTING_S=1270 TABLE_JOBS=12 TABLE_WAVE_S=1000 ran 12
# cells in 15 min 48 s (session 32); SITTING_S=1150 with the same wave left a window of 68 s, shorter than a
# compilation, and started 3 of 12 (session 51; since c3f76fd a cell waiting in time for its graph still starts).
# On a warm machine, `more` with 699 s left ran 4 cells in one call (TABLE_JOBS=4 TABLE_WAVE_S=470 SITTING_S=600
# LIMIT=575: 7 min 21 s). A running cell's checkpoint (about 58 MB) fits neither $OUT nor carry, so a
# lost wave stays lost. reports/testbed/README.md (sessions 32 and 33) has the measurements.
# That holds for cells of the profile's batch (24). Table 8's smaller ones take longer: in session 34's wave of 14,
# 12 cells ended within 18 min 51 s, N=12 s0 took 1,323 s, and one cell (not named; N=6 s0 is the one seed-0 row of
# Table 8 not stored) still ran at 24 min 52 s, when the device time ran out. Putting Table 8 last in the queue
# would not keep it out of a wave: a cell waits while another cell compiles its graph, and the cells after it start
# instead, so a wave starts one cell for each graph it can (Table 8's rows are six). So $TABLES leaves Table 8 out,
# and it runs in sittings of its own: TABLES=table8 TABLE_ROWS=N=48,K=1,K=3,K=9 as a wave like the others, and N=6
# and N=12 with fewer TABLE_JOBS. Session 56 measured them three to a wave on an H100 (TABLE_JOBS_H100=3): N=12 s3
# took 787 s (37.7 s an epoch), and N=6 s0 and s1 beside it logged 6 and 5 of 20 epochs in 382 s, about 1,300 s a
# cell, so N=6 wants a sitting that starts with about 1,500 s left. poll lists the cells started and not stored,
# with their epochs so far. Stop a cell by its process id, never with pkill -f on a pattern: the device call's own
# shell holds the pattern in its command line, and session 56's pkill -f 'table8/N=6/' ended that call at once.
#
# The records' code_version: the device copy's git is the session's base commit, so after commits here a
# sitting records "<base>+dirty"; from a clean tree, prefix the command with EHIN_CODE_VERSION=<git rev-parse
# --short=10 HEAD, typed here> (bench.store.code_version reads it first; session 41's 8 records lack it).
# Carry [".whl", "frozen"], and "handover" when an earlier sitting handed chains over (task handover). A call carries
# at most 64 MiB, the tracked files included, counted (as session 47's refusal and acceptance both fit) by the
# blocks the files take on disk: `git ls-files -z | xargs -0 du -c --block-size=1 | tail -n 1` (40.1 MB at session
# 47's end), plus `du -s --block-size=1 .whl frozen handover`. So frozen/ (18.8 MB) and a handover (a chain's labels
# are 4.7-20 MB: session 47's six) do not travel together: carry [".whl", "handover"], whose start remakes the CLIP
# (about 160 s on an H100, 70 more than carrying it), with in handover/ the chains that fit the rest (21.7 MB at
# session 47's end). The wheels
# (the device image has torch but not these), fetched here with the device README's pip download command
# (--python-version 3.12, manylinux platforms) into .whl/: open_clip_torch==3.3.0 pycocotools==2.0.11
# submitit==1.5.4 ftfy wcwidth==0.2.13 Cython==0.29.36, and the sdist of pydensecrf2==1.1 (pip download --no-binary=:all:).
# Not optuna and its dependencies (alembic sqlalchemy colorlog mako): no task here searches, and a call carries at
# most 64 MiB, tracked files included (session 47: the tracked files, frozen/ and 10.9 MB of wheels with them, 69.9
# MB on disk, were refused; with 5.3 MB of wheels, 64.3 MB, carried). frozen/ holds the gpu profile's small CLIP; without it `start` remakes it by
# deterministic GPU pretraining of the profile's recipe (ehin.pretrain_clip --freeze), which sessions 19 and 20 did
# to the same bytes; a file whose sha256 does not begin with its name's last 8 hex digits, or a remade file of
# another name, stops the start before any cell runs.
# Session 62: with 43.6 MB of tracked files on disk (the gpu store's 277 records and per-expression files), frozen/
# and the wheels no longer fitted (65.7 MiB, refused). Carry [".whl", ".frz"] instead: .frz/ (git-ignored like
# .whl/ and frozen/: echo /.frz/ >> .git/info/exclude) holds the same file xz-compressed
# (xz -6 -c frozen/$FROZEN > .frz/$FROZEN.xz, 17.3 MB) and its .json, which start unpacks into frozen/ (its sha256
# checked as above), and .whl/ wcwidth==0.2.13 (pure Python, 34 kB) in place of the 823 kB compiled 0.9.5 (ftfy
# needs some wcwidth): 63.4 MiB in all. When the tracked files grow past that, carry [".whl"] alone and let start
# remake the CLIP.
# Session 63: the per-expression files now keep their ids as steps and no iou (ehin.evaluate.ID_STEPS), which took
# the tracked files to 28.5 MB on disk; with .whl/ and frozen/ that is 50.2 MiB, so [".whl", "frozen"] carries again
# (or [".whl", ".frz", "handover"] with a handover of up to about 14 MiB). No call of the session got a machine that
# ran: seven calls were refused ("no device machine could be started right now", 90-180 s each), one came inside a
# refusal's wait (15 s) and the ninth's machine was taken back before the call ended (239 s): 1,155 s of device
# time, nothing stored. The 645 s left fit no training (start, then one synth-referit Stage-1 cell: about 700 s).
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" /tmp/p
export PYTHONUNBUFFERED=1 EHIN_CACHE=/tmp/ehc TQDM_DISABLE=1
if [ -d .whl ]; then
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
crf() {  # pydensecrf2 (the pseudo-labels' dense CRF, Table 2's Stage-2 cells) is an sdist: built here with the
         # carried Cython 0.29.36, without build isolation (nothing can be downloaded here); 30 s on 2 cores
  python3 -c "import pydensecrf.densecrf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
    --no-build-isolation --no-cache-dir --target /tmp/site .whl/pydensecrf2-*.tar.gz
}
RECIPE="synthetic:scenes=cluttered,scene_on_black=1.0,captions=referring,steps=1200,n_train=16000"
FROZEN=clip-tiny-rn-2195732df831-939486c5.pt
PACKED=(--mps --compile-wait 240 --set train.compile=reduce-overhead)
INFER_ARGS="--size paper --configs ehin --skip train,stage2 --amp --channels-last --fold-bn --compile reduce-overhead"
STAGE2_ARGS="--size gpu --configs ehin --skip train,infer --channels-last --fused-adamw"
TABLES=${TABLES:-table5,table6,table3,table4,table7,fig7,table9}  # Table 8 in sittings of its own (the comment above)
G=/tmp/p/g RR=/tmp/p/rr CL=/tmp/p/cl D2=/tmp/p/d2  # the stores on this machine
infer() {  # bench.perf with $PERF_ARGS (default $INFER_ARGS) for at most $1 s, as $2/$NAME.json (TRACE=1: profiled,
           # tables and traces in $2/t)
  timeout "$1" python3 -m bench.perf ${PERF_ARGS:-$INFER_ARGS} ${TRACE:+--trace "$2/t"} --out "$2/${NAME:-h200_infer}.json"
}

launch() {  # the tasks $1 in one detached process, from start's copy of the tree (/tmp/p/src); tables.env: what poll's
            # listing of started cells names, the tables task's cells or the table2 task's in a sitting without it
  case " $1 " in
    *" tables "*) printf 'TABLES=%q TABLE_ROWS=%q TABLE_JOBS=%q SEEDS=\n' "$TABLES" "${TABLE_ROWS:-}" "${TABLE_JOBS:-14}" ;;
    *) printf 'TABLES=table2 TABLE_ROWS=%q TABLE_JOBS=%q SEEDS=%q\n' "${TABLE2_ROWS:-}" "${TABLE2_JOBS:-6}" "${TABLE2_SEEDS:-}" ;;
  esac > /tmp/p/tables.env
  rm -f /tmp/p/tasks.done
  (cd /tmp/p/src && TASKS="$1" setsid nohup bash reports/h200_session.sh _tasks >> /tmp/p/tasks.log 2>&1 < /dev/null &
   echo $! > /tmp/p/tasks.pid)
}

poll_since() {  # poll in this call, which began at $1 (LIMIT and CALL_S counted from then)
  local e=$(( $(date +%s) - $1 ))
  LIMIT=$(( ${LIMIT:-570} - e )) CALL_S=$(( ${CALL_S:-600} - 5 - e )) exec bash "$0" poll
}

case "${1:-}" in
start)
  if [ -f /tmp/p/tasks.pid ]; then  # running or done: their results are not all returned yet
    echo "start already ran on this machine: poll it (a second start would copy the committed stores over the tasks'"
    echo "results, re-stamp what poll returns and move the deadline past the machine's)"
    exit 4
  fi
  t0=$(date +%s)
  if [ ! -f "frozen/$FROZEN" ] && [ -f ".frz/$FROZEN.xz" ]; then  # carried xz-compressed (session 62: the comment above)
    mkdir -p frozen && python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
      ".frz/$FROZEN.xz" "/tmp/$FROZEN" && mv "/tmp/$FROZEN" frozen/ && cp ".frz/${FROZEN%.pt}.json" frozen/
  fi
  if [ -f "frozen/$FROZEN" ]; then
    sha=$(sha256sum "frozen/$FROZEN" | cut -c1-8)
    [ "${FROZEN%.pt}" = "${FROZEN%-*}-$sha" ] || { echo "frozen/$FROZEN: sha256 begins $sha: stop"; exit 3; }
    echo "frozen/$FROZEN carried, sha256 begins $sha"
  else
    python3 -m ehin.pretrain_clip --profile gpu --workers 12 --freeze /tmp/frozen \
      --set backbone.pretrained=$RECIPE > /tmp/p/clip.log 2>&1 &
  fi
  crf > /tmp/p/crf.log 2>&1 &
  for v in refcoco refcoco+ refcocog referit; do  # the gpu profile's datasets (CPU), one process per variant
    python3 -c "from ehin.config import load_config; from ehin.data import prepare_dataset
prepare_dataset(load_config(profile='gpu', overrides=['data.dataset=synth-$v']), progress=False)" \
      > /tmp/p/data-$v.log 2>&1 &
  done
  wait
  if [ ! -f "frozen/$FROZEN" ]; then
    tr '\r' '\n' < /tmp/p/clip.log | grep -a -v "it/s" | tail -n 3
    name=$(basename "$(ls /tmp/frozen/*.pt)")
    [ "$name" = "$FROZEN" ] || { echo "remade $name, not $FROZEN: stop"; exit 3; }
    mkdir -p frozen && cp /tmp/frozen/* frozen/ && cp /tmp/frozen/*.json /tmp/p/clip.log "$OUT/"
    # the .pt too, to be carried next time: a file back from $OUT is at most 16 MiB, so in parts
    # (here: cat $FILES_AT/$FROZEN.part-* > frozen/$FROZEN; its sha256 is checked at the next start)
    split -b 15M -d "frozen/$FROZEN" "$OUT/$FROZEN.part-"
  fi
  python3 -c "import pydensecrf.densecrf" || { tail -n 5 /tmp/p/crf.log; echo "pydensecrf2 did not build: Stage-2 cells will fail"; }
  echo "clip, datasets, CRF: $(( $(date +%s) - t0 )) s"
  mkdir -p $G $RR
  cp -r reports/gpu/store/. $G/ 2>/dev/null
  [ -d handover ] && cp -r handover/. $G/ \
    && echo "handed over: the labels of $(find handover -name '*.npz' | wc -l) chains"  # task handover
  cp -r reports/testbed/control-gpu-clip1-rerun/. $RR/ 2>/dev/null
  mkdir -p $CL && cp -r reports/testbed/control-gpu-clip1/. $CL/ 2>/dev/null
  # the machine goes back 30 minutes after it was taken, about 90 s before this call began: a sweep task starts
  # cells only while a wave still has time to end before then (--start-within), and poll returns before it
  echo $(( t0 + ${SITTING_S:-1650} )) > /tmp/p/deadline
  touch /tmp/p/stamp  # what is newer goes back
  # the tasks run from a copy of this tree: each device call copies the working tree here anew, and a module
  # imported while that copy is made is missing (session 26 lost its rerun and a table cell to
  # "No module named 'ehin.train_stage1'" and "cannot import name 'mps'" as a poll began)
  rm -rf /tmp/p/src && cp -a "$PWD" /tmp/p/src
  # a call naming nvidia-h200 may get an H100, where a wave takes longer (the comment above): TABLE_JOBS_H100, when
  # set, is the wave's size there, so that one command fits the sitting on either card
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1); echo "card: ${card:-none}"
  if [ -n "${TABLE_JOBS_H100:-}" ] && [[ $card != *H200* ]]; then
    export TABLE_JOBS=$TABLE_JOBS_H100; echo "not an H200: TABLE_JOBS=$TABLE_JOBS"
  fi
  launch "${TASKS:-table10 tables}"
  echo "tasks '${TASKS:-table10 tables}' launched after $(( $(date +%s) - t0 )) s"
  ;;
_tasks)
  for task in ${TASKS:-table10 tables}; do
    echo "== $task $(date +%T)"
    case $task in  # the seconds a wave of the task's cells needs to end (20 TRIS-like cells packed: 17 min)
      table10) wave=${TABLE10_WAVE_S:-60} ;; infer|perf|stage2|ddp2) wave=0 ;; tables) wave=${TABLE_WAVE_S:-1320} ;;
      table2) wave=${TABLE2_WAVE_S:-600} ;;
      handover) wave=${HANDOVER_WAVE_S:-200} ;;
      *) wave=${CONTROL_WAVE_S:-1080} ;;
    esac
    w=$(( $(cat /tmp/p/deadline) - $(date +%s) - wave ))
    if [ "$w" -lt 1 ]; then echo "== $task skipped: a wave needs ${wave} s, the machine goes in $(( w + wave )) s"; continue; fi
    W=(--start-within "$w")
    case $task in
      table10) python3 -m bench.run table10 --profile gpu --jobs 1 "${W[@]}" --results $G --reports /tmp/p/reports ;;
      rerun) python3 -m bench.testbed --profile gpu --seeds ${RERUN_SEEDS:-5} --results $RR --jobs ${JOBS:-30} \
               "${PACKED[@]}" "${W[@]}" --name rerun --out /tmp/p/rep ;;
      tables) python3 -m bench.run "$TABLES" --profile gpu ${TABLE_ROWS:+--rows "$TABLE_ROWS"} --jobs ${TABLE_JOBS:-14} \
                "${PACKED[@]}" "${W[@]}" --results $G \
                --reports /tmp/p/reports ;;
      table2) python3 -m bench.run table2 --profile gpu ${TABLE2_ROWS:+--rows "$TABLE2_ROWS"} ${TABLE2_SEEDS:+--seeds $TABLE2_SEEDS} \
                --jobs ${TABLE2_JOBS:-6} "${PACKED[@]}" --set pseudo.workers=${PSEUDO_WORKERS:-12} "${W[@]}" --results $G \
                --reports /tmp/p/reports ;;
      handover) rows=${HANDOVER_ROWS:-${TABLE2_ROWS:-}}; rows=${rows//Stage-1/Stage-2}
                python3 -m bench.run table2 --profile gpu ${rows:+--rows "$rows"} \
                  ${TABLE2_SEEDS:+--seeds $TABLE2_SEEDS} --set pseudo.workers=${PSEUDO_WORKERS:-14} "${W[@]}" \
                  --results $G --hand-over /tmp/p/handover ;;
      clip) python3 -m bench.testbed --profile gpu --seeds 10 --rows "refcoco+,refcocog (umd)" --set train.grad_clip=1.0 \
              --results $CL --jobs ${JOBS:-30} "${PACKED[@]}" "${W[@]}" --name clip1 --out /tmp/p/rep ;;
      control) python3 -m bench.testbed --profile gpu --seeds 10 --set train.grad_clip=1.0 \
                 --results $CL --jobs ${JOBS:-30} "${PACKED[@]}" "${W[@]}" --name clip1 --out /tmp/p/rep ;;
      infer) infer $(( w < ${INFER_LIMIT:-420} ? w : ${INFER_LIMIT:-420} )) /tmp/p ;;
      stage2) timeout 150 python3 -m bench.perf $STAGE2_ARGS --out /tmp/p/h200_gpu_stage2_eager.json
              timeout 150 python3 -m bench.perf $STAGE2_ARGS --compile-train reduce-overhead --out /tmp/p/h200_gpu_stage2_ro.json ;;
      perf) python3 -m bench.perf --size gpu --configs ehin,tris --skip infer,stage2 --channels-last --fused-adamw \
              --procs 16 --mps --compile-train reduce-overhead --out /tmp/p/h200_gpu_ehin_tris_procs16_mps_ro.json ;;
      ddp2) [ "$w" -gt 60 ] && timeout $(( w < 420 ? w : 420 )) python3 -m bench.perf --size paper --configs ehin \
              --skip infer --amp --channels-last --fused-adamw --ddp 2 --out /tmp/p/h200_x2_ddp2_bf16_cl_fused.json
            w=$(( $(cat /tmp/p/deadline) - $(date +%s) - ${DDP_WAVE_S:-900} ))
            if [ "$w" -le 0 ]; then echo "== ddp2's cells skipped: a wave needs ${DDP_WAVE_S:-900} s"; false; else
              # no MPS: NCCL between processes under one MPS daemon was never tried here
              mkdir -p $D2 && cp -r reports/gpu/store-ranks2/. $D2/ 2>/dev/null
              python3 -m bench.run table5 --rows bg+fg+cl --profile gpu --ranks 2 --jobs 5 --start-within "$w" \
                --results $D2 --reports /tmp/p/reports
            fi ;;
      *) echo "unknown task $task"; false ;;
    esac
    rc=$?
    echo "== $task ended $(date +%T), exit $rc"  # 3: --start-within left cells for the next sitting
  done
  touch /tmp/p/tasks.done  # poll's sign (the detached process may be nobody's child to reap)
  ;;
poll)
  [ -f /tmp/p/tasks.pid ] || { echo "no tasks were started on this machine (a new one: run start)"; exit 5; }
  limit=${LIMIT:-580} t0=$(date +%s)
  # UNTIL_S: the deadline moved to that many seconds from now, when the device time left (the caller's `status`,
  # less about 40 s for the call's transfers) outlasts SITTING_S's guess. Session 52's cells ran past their wave on
  # an H100 with 210 s of device time left, and a poll at the deadline waited for none of it
  [ -n "${UNTIL_S:-}" ] && echo $(( t0 + UNTIL_S )) > /tmp/p/deadline
  dl=$(( $(cat /tmp/p/deadline) - 20 ))  # back before the machine goes, with what it has: the wait, the listing
  end=$(( t0 + limit )); [ "$end" -gt "$dl" ] && end=$dl  # and the utilisation below all end by then
  while [ ! -f /tmp/p/tasks.done ] && [ "$(date +%s)" -lt "$end" ]; do
    r=$(( end - $(date +%s) )); sleep $(( r < 10 ? r : 10 ))
  done
  [ -f /tmp/p/tasks.done ] && echo "tasks done after $(( $(date +%s) - t0 )) s" \
    || echo "tasks still running after $(( $(date +%s) - t0 )) s"
  echo "stored: tables $(cat $G/store*.jsonl 2>/dev/null | wc -l), rerun $(cat $RR/store.jsonl 2>/dev/null | wc -l), clip $(cat $CL/store.jsonl 2>/dev/null | wc -l), ranks2 $(cat $D2/store.jsonl 2>/dev/null | wc -l)"
  # the stores whole (small), and of the per-expression scores only those written in this sitting: packed first,
  # so that a call cut off by its own limit during the listings below still returns them (session 38's first
  # poll, sent with LIMIT 580, ran past the call's 600 s in the dry run below and returned nothing)
  (cd /tmp/p && find g/per_expression rr/per_expression cl/per_expression d2/per_expression -newer stamp -type f \
     2>/dev/null > new.txt
   ls g/store.jsonl rr/store.jsonl cl/store.jsonl d2/store.jsonl h200_*.json tasks.log 2>/dev/null >> new.txt
   tar czf "$OUT/stores.tgz" --ignore-failed-read -T new.txt) || echo "tar: exit $?"
  # handed-over chains (task handover), as one tar in parts of 15 MiB, the first three here. What comes back from
  # $OUT is at most 8 files of 16 MiB, 64 MiB in all, none more than two folders down: session 47's
  # handover/runs/table2/... came back as nothing, and its six chains' 66 MB as five parts over two calls. Here:
  # cat <each call's files_at>/handover.tar.part-* (in order) | tar xf - -C <somewhere>, then copy into handover/
  # the chains a sitting can carry (the header says how many). Each file arrives whole (bench.run --hand-over
  # renames it into place), the label file last: while the task runs, a chain without its label file is not done
  if [ -d /tmp/p/handover ]; then
    (cd /tmp/p && rm -f handover.tar.part-* && tar cf - --exclude='*.tmp' handover | split -b 15M -d - handover.tar.part-)
    n=$(ls /tmp/p/handover.tar.part-* | wc -l)
    ls /tmp/p/handover.tar.part-* | head -n 3 | xargs -r -I{} cp {} "$OUT/"
    echo "handover$([ -f /tmp/p/tasks.done ] || echo ", still running"): the labels of $(find /tmp/p/handover -name '*.npz' | wc -l) chains, $n parts, 3 here at most$(
      [ "$n" -gt 3 ] && echo "; the others: FIRST=3 bash reports/h200_session.sh handback, at once")"
  fi
  grep -a "^==" /tmp/p/tasks.log  # each task's start and end; then failures, without the [sweep] progress lines
  grep -a "failed\|Error" /tmp/p/tasks.log | grep -a -v "^\[sweep\]" | tail -n 10; grep -a "\[sweep\]" /tmp/p/tasks.log | tail -n 2
  # the table cells started and not stored, with their epochs: what a machine lost now would take with it (the
  # tasks' code and table settings, saved by start; a dry run writes nothing)
  # (at most 60 s, and only what a device call of CALL_S s has left after the wait, the 5 s below kept)
  dry=$(( ${CALL_S:-600} - 10 - ($(date +%s) - t0) )); [ "$dry" -gt 60 ] && dry=60
  r=$(( dl - $(date +%s) )); [ "$dry" -gt "$r" ] && dry=$r  # the listing, too, ends by the deadline less 20 s
  if [ -d $G/runs ] && [ "$dry" -le 5 ]; then echo "cells started, not stored: not listed (${dry} s left in this call or before the machine goes)"
  elif [ -d $G/runs ]; then
    (. /tmp/p/tables.env && cd /tmp/p/src && PYTHONPATH=/tmp/site:/tmp/p/src timeout -k 2 $dry \
      python3 -m bench.run "$TABLES" --profile gpu ${TABLE_ROWS:+--rows "$TABLE_ROWS"} ${SEEDS:+--seeds $SEEDS} --jobs $TABLE_JOBS \
      "${PACKED[@]}" --results $G --dry-run > /tmp/p/dry.txt 2>&1; echo $? > /tmp/p/dry.rc)
    grep -a "\[started\|Error\|error:" /tmp/p/dry.txt | sed 's/^ */started, not stored: /'
    [ "$(cat /tmp/p/dry.rc)" = 124 ] && echo "cells started, not stored: the listing ran past its ${dry} s and is incomplete"
  fi
  # is a packed wave bound by the GPU or by the 16 cores? both utilisations, the CPU's over 5 s
  { nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
    read -r _ a1 a2 a3 a4 a5 a6 a7 _ < /proc/stat; sleep 5; read -r _ b1 b2 b3 b4 b5 b6 b7 _ < /proc/stat
    busy=$(( (b1+b2+b3+b6+b7) - (a1+a2+a3+a6+a7) )) idle=$(( (b4+b5) - (a4+a5) ))
    echo "cpu busy $(( 100 * busy / (busy + idle) )) % of $(nproc) cores over 5 s; load $(cut -d' ' -f1-3 /proc/loadavg)"
  } > /tmp/p/util.txt 2>&1
  cat /tmp/p/util.txt
  ;;
go)  # start and the first poll in one call: one gap between calls fewer (the machine can go in any gap, above);
     # session 39's `go` kept its machine through start and a 470 s wait
  t=$(date +%s)
  bash "$0" start; rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 4 ] || exit $rc  # 4: a start ran here already (go sent twice): poll it
  poll_since $t
  ;;
more)  # (session 48) more TASKS on this machine once start's are done, on the stores they left (a second start would
       # copy the committed ones over them) and the code start copied, then poll in the same call. The deadline is
       # start's, or SITTING_S from here (the device time left less 200) when that is sooner: the machine still goes
       # 30 minutes after it was taken. Session 48's first tasks ended with 823 s left, and the next cells, run by
       # hand without --start-within or a poll, were lost with the call
  [ -f /tmp/p/tasks.done ] || { echo "no tasks done on this machine: poll them, or start"; exit 5; }
  t=$(date +%s)
  dl=$(cat /tmp/p/deadline)
  [ -n "${SITTING_S:-}" ] && [ $(( t + SITTING_S )) -lt "$dl" ] && echo $(( t + SITTING_S )) > /tmp/p/deadline
  echo "the machine's deadline: $(( $(cat /tmp/p/deadline) - t )) s from now"
  launch "${TASKS:-table2}"
  echo "tasks '${TASKS:-table2}' launched"
  poll_since $t
  ;;
salvage)  # (session 65) a sitting ending before its Stage-2 chains do: what they made, handed over as task handover's
          # files (bench.run --hand-over: the labels a running chain made, with its stage 1's result.json) and returned
          # at once by a poll that waits for nothing. Chains that have not made their labels are skipped; a chain of
          # the sitting's rows whose stage 1 is trained and that nothing runs has its labels made here, for at most
          # SALVAGE_S s (default 60). Carry the result as handover/ (the comment on task handover)
  . /tmp/p/tables.env
  rows=${TABLE_ROWS//Stage-1/Stage-2}
  (cd /tmp/p/src && PYTHONPATH=/tmp/site:/tmp/p/src timeout -k 2 ${SALVAGE_S:-60} python3 -m bench.run table2 --profile gpu ${rows:+--rows "$rows"} \
     ${SEEDS:+--seeds $SEEDS} --results $G --hand-over /tmp/p/handover)
  LIMIT=0 CALL_S=15 exec bash "$0" poll
  ;;
handback)  # the handover's parts from FIRST (0 the first) that poll did not return, four a call (64 MiB)
  ls /tmp/p/handover.tar.part-* | tail -n +$(( ${FIRST:-3} + 1 )) | head -n 4 | xargs -r -I{} cp {} "$OUT/"
  ls -l "$OUT"
  ;;
perf)  # issue 20: bench.perf (infer, above) in the foreground, into $OUT
  infer ${LIMIT:-300} "$OUT" > /tmp/p/perf.log 2>&1
  rc=$?
  grep -a -v "it/s" /tmp/p/perf.log | tail -n 8
  if [ -n "${TRACE:-}" ]; then head -n 40 "$OUT"/t/*bs64.txt 2>/dev/null; fi
  exit $rc
  ;;
*) echo "usage: $0 start|poll|go|more|salvage|handback|perf"; exit 2 ;;
esac

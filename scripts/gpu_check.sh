#!/bin/bash
# The GPU path in one short script (about 4 minutes on one H100; docs/performance.md, "GPU path"):
#  1. the entry point on GPU: PGD-AT base + rift_bn k=1, then rift k=1 from the cached MRC table
#     (trainer=gpu: bf16-mixed; model.channels_last=true; full-width ResNet-18; paper protocol otherwise);
#  2. exact vs linear MRC on that base (python -m benchmarks.mrc_agreement compare);
#  3. the benchmark ratios on the GPU (python -m benchmarks.bench);
#  4. model.compile=true vs eager adversarial training, same settings;
#  5. MRC run to run: trainer.deterministic=warn twice, false twice (MRC table recomputed each time).
# Usage: OUT=gpu_check DATA=data bash scripts/gpu_check.sh   (DATA: a CIFAR-10 python layout, >= 3,000 images)
# Env: PY (default python3), OUT (results: logs + JSON), DATA, DEV (cuda; cpu with SMALL=1 is a dry run).
# Its own cache, always ($OUT/cache: it deletes MRC tables there); exit status 1 if any step failed.
PY=${PY:-python3}; DEV=${DEV:-cuda}; OUT=${OUT:-gpu_check}; DATA=${DATA:-data}
mkdir -p "$OUT"; RUNS=$(mktemp -d); FAILED=0
export PYTHONUNBUFFERED=1 RIFT_BN_CACHE=$(cd "$OUT" && pwd)/cache HYDRA_FULL_ERROR=1
export PYTHONPATH=$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}  # benchmarks/ (not installed)
if [ "$DEV" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt" 2>&1
  TR="trainer=gpu model.channels_last=true"; W=64
else
  TR="trainer=cpu"; W=4
fi
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" >> "$OUT/env.txt"
SIZE="data.val_size=1000 data.test_subset=2000 at.epochs=4 at.milestones=[3] finetune.epochs=2 finetune.milestones=[1]"
VS=1000
if [ -n "$SMALL" ]; then
  SIZE="data.train_subset=600 data.val_size=100 data.test_subset=100 at.epochs=1 at.milestones=[1] finetune.epochs=1 \
 finetune.milestones=[1] mrc.epochs=2 mrc.batch_size=50"; VS=100
fi
COMMON="data.root=$DATA data.download=false model.width=$W logger=csv $TR $SIZE"
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record exit status and wall seconds
  local name=$1 s; shift; s=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?; [ $rc -ne 0 ] && FAILED=1
  echo "$name rc=$rc $(( $(date +%s) - s )) s" | tee -a "$OUT/env.txt"
}
step rift_bn $PY -m rift_bn.run method=rift_bn k=1 $COMMON hydra.run.dir=$RUNS/rift_bn
step rift $PY -m rift_bn.run method=rift k=1 $COMMON hydra.run.dir=$RUNS/rift
for m in rift_bn rift; do cp "$RUNS/$m/results.json" "$OUT/${m}_results.json" || FAILED=1; done
CK=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['base']['checkpoint'])" "$OUT/rift_bn_results.json")
step compare $PY -m benchmarks.mrc_agreement compare --checkpoint "$CK" --data-root "$DATA" --width $W --val-size $VS \
  --device $DEV --kinds both --json "$OUT/compare.json"
BQ=""; [ -n "$SMALL" ] && BQ="--quick"
step bench $PY -m benchmarks.bench $BQ --device $DEV --width $W --json "$OUT/bench.json"
for c in true false; do  # a seed of their own: each trains its own base
  step at_compile_$c $PY -m rift_bn.run +experiment=at seed=$([ $c = true ] && echo 1 || echo 2) model.compile=$c \
    $COMMON at.epochs=3 at.milestones=[2] hydra.run.dir=$RUNS/at_$c
done
for r in warn_a warn_b false_a false_b; do
  rm -rf "$RIFT_BN_CACHE/mrc"
  step mrc_$r $PY -m rift_bn.run method=rift_bn k=1 $COMMON force=true trainer.deterministic=${r%_*} \
    hydra.run.dir=$RUNS/$r
  cp "$RUNS/$r/results.json" "$OUT/mrc_$r.json" || FAILED=1
done
$PY - "$OUT" <<'PY' | tee -a "$OUT/env.txt"
import json, sys
out = sys.argv[1]
m = {r: {row["name"]: row["mrc"] for row in json.load(open(f"{out}/mrc_{r}.json"))["mrc"]}
     for r in ("warn_a", "warn_b", "false_a", "false_b")}
for a, b in (("warn_a", "warn_b"), ("false_a", "false_b"), ("warn_a", "false_a")):
    d = max(abs(m[a][n] - m[b][n]) / max(abs(m[b][n]), 1e-12) for n in m[a])
    same = sorted(m[a], key=m[a].get) == sorted(m[b], key=m[b].get)
    print(f"mrc {a} vs {b}: {'identical' if m[a] == m[b] else f'max rel diff {d:.2e}'}, ranking {'same' if same else 'differs'}")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || FAILED=1
rm -rf "$RUNS"
exit $FAILED

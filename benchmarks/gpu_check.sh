#!/usr/bin/env bash
# One GPU check, at most 5 minutes, writing one JSON of figures.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--release /path/to/GMMFormer_v2]
#
# Run from the repository root. The interpreter is $PRVR_GPU_CHECK_PYTHON, else the active
# virtual environment's python, else the repository's .venv, else python3 on PATH; it needs
# torch, numpy, scipy, h5py, pyyaml, tqdm and matplotlib, and no installed prvr, DVC or MLflow:
# src/ goes on PYTHONPATH here, and the stages run with --no-mlflow. Without pytest the two test
# steps are recorded as not run (rc -2). OUT_DIR defaults to $OUT, else /tmp/prvr_gpu_check.
# Steps, in this order,
# each under its own time limit and all within 290 s (a step that fails or times out is
# recorded and the rest still run; one with no time left is recorded as skipped, rc -1):
#   tests        pytest -k "cuda and not cuda_training": the test_cuda_* of tests/ (they skip
#                without CUDA): eval CUDA == CPU, bf16, the memory budget, the prefetcher
#   step         benchmarks/bench_train_step.py --device cuda (TVR shapes, 32 and 128 videos;
#                + the release's step on the same batches with --release)
#   demo_fp32    stages fetch -> train -> evaluate of the demo (GMMFormer v2), device cuda
#   tests_train  pytest -k cuda_training: one bf16 epoch per method on CUDA (inductor for two)
#   demo_bf16    the demo again with train.precision and evaluate.precision bf16
#   epoch        benchmarks/bench_epoch.py --only ours (its train stage runs with train.device
#                auto, so on CUDA; --device is passed when the script has it), 256/64/128 videos
# Result: OUT_DIR/gpu_check.json (figures, each step's command, rc and seconds) and
# OUT_DIR/logs/<step>.log. Exit status 0 when every step passed, 1 otherwise, 2 without CUDA.
# PRVR_GPU_CHECK_DEVICE=cpu runs the same steps on CPU, shortened (demo corpus at
# PRVR_GPU_CHECK_SCALE, default 0.1 there, trained for PRVR_GPU_CHECK_EPOCHS, default 1 there;
# smaller step and epoch benchmarks), to check the script itself on a machine without a GPU
# (the figures then mean nothing).
set -u -o pipefail

OUT_DIR="${OUT:-/tmp/prvr_gpu_check}"
RELEASE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --release) RELEASE="$2"; shift 2 ;;
    *) OUT_DIR="$1"; shift ;;
  esac
done
DEVICE="${PRVR_GPU_CHECK_DEVICE:-cuda}"
LIMIT_FACTOR=1
SCALE="${PRVR_GPU_CHECK_SCALE:-1.0}"
EPOCHS="${PRVR_GPU_CHECK_EPOCHS:-}"        # empty: the demo recipe's own
if [ "$DEVICE" = "cpu" ]; then              # the CPU self-check: same steps, smaller, slower
  LIMIT_FACTOR=4
  SCALE="${PRVR_GPU_CHECK_SCALE:-0.1}"
  EPOCHS="${PRVR_GPU_CHECK_EPOCHS:-1}"
fi
REPO="$(pwd)"
if [ -n "${PRVR_GPU_CHECK_PYTHON:-}" ]; then PY="$PRVR_GPU_CHECK_PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PY="$VIRTUAL_ENV/bin/python"
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY="python3"
fi
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"   # no `pip install -e .` needed

if [ ! -f "$REPO/src/prvr/accel.py" ] || [ ! -f "$REPO/params.yaml" ]; then
  echo "gpu_check: run it from the repository root (no src/prvr/accel.py or params.yaml in $REPO)" >&2
  exit 2
fi
if [ "$DEVICE" = "cuda" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: needs CUDA, and $("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1) sees no CUDA device; nothing was run" >&2
  exit 2
fi
if [ -n "$RELEASE" ] && [ ! -d "$RELEASE/src" ]; then
  echo "gpu_check: --release $RELEASE: no src/ folder there" >&2
  exit 2
fi
mkdir -p "$OUT_DIR/logs"
WORK="$(mktemp -d /tmp/prvr_gpu_check_work.XXXXXX)"
STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
unset MLFLOW_TRACKING_URI WORLD_SIZE RANK LOCAL_RANK

START=$(date +%s)
TOTAL_S=$(( 290 * LIMIT_FACTOR ))   # the whole check stays under 5 minutes

step() {  # step NAME LIMIT_S COMMAND...: run it, log it, record rc and seconds
  local name="$1" limit="$(( $2 * LIMIT_FACTOR ))"; shift 2
  local t0 t1 rc secs left
  left=$(( TOTAL_S - ($(date +%s) - START) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then           # no time left: recorded as not run (rc -1)
    printf '%s\t%s\t%s\t%s\n' "$name" -1 0 "$*" >> "$STEPS"
    echo "== $name: skipped, the 5 minutes are used up"
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT_DIR/logs/$name.log"
  t0=$(date +%s%N)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$OUT_DIR/logs/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  secs=$(printf '%d.%03d' $(( (t1 - t0) / 1000000000 )) $(( (t1 - t0) / 1000000 % 1000 )))
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$*" >> "$STEPS"
  echo "   rc $rc, $secs s"
}

demo_workdir() {  # demo_workdir DIR PRECISION: params.yaml of the demo on $DEVICE
  mkdir -p "$1"
  "$PY" - "$REPO/params.yaml" "$1/params.yaml" "$DEVICE" "$2" "$SCALE" "$EPOCHS" <<'EOF'
import sys, yaml
src, dst, device, precision, scale, epochs = sys.argv[1:]
p = yaml.safe_load(open(src, encoding="utf-8"))
p["dataset"] = "demo"
p["model"]["name"] = "gmmformer_v2"
p["train"].update(device=device, precision=precision)
p["evaluate"].update(device=device, precision=precision)
if float(scale) != 1.0:
    p["datasets"]["demo"]["generator"]["scale"] = float(scale)
if epochs:
    p["methods"]["gmmformer_v2"]["demo"]["epochs"] = int(epochs)
yaml.safe_dump(p, open(dst, "w", encoding="utf-8"), sort_keys=False)
EOF
}

demo() {  # demo NAME PRECISION: fetch, train, evaluate in a fresh workdir
  local dir="$WORK/$1"
  demo_workdir "$dir" "$2"
  (cd "$dir" && "$PY" "$REPO/stages/fetch.py" --no-progress \
     && "$PY" "$REPO/stages/train.py" --no-progress --no-mlflow \
     && "$PY" "$REPO/stages/evaluate.py" --no-progress --no-mlflow)
}
export -f demo demo_workdir
export PY REPO WORK DEVICE SCALE EPOCHS

HAVE_PYTEST=1
"$PY" -c "import pytest" 2>/dev/null || HAVE_PYTEST=0
pytest_step() {  # pytest_step NAME LIMIT_S ARGS...: a pytest step, or rc -2 when pytest is missing
  local name="$1" limit="$2"; shift 2
  if [ "$HAVE_PYTEST" = 0 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" -2 0 "pytest $*" >> "$STEPS"
    echo "== $name: not run, $PY has no pytest" | tee -a "$OUT_DIR/logs/$name.log"
    return
  fi
  step "$name" "$limit" "$PY" -m pytest -q -p no:cacheprovider -rs "$@" \
    --junitxml="$OUT_DIR/logs/$name.xml"
}

# In order of what a GPU machine should tell first; each step is capped by what is left.
# 1. the CUDA tests (on CPU: the same selection, which then skips), the training ones apart
pytest_step tests 60 -k "cuda and not cuda_training" tests
# 2. the training step at TVR shapes, ours (and the release's, same batches)
STEP_ARGS=(--device "$DEVICE" --videos 32 128 --reps 5 --warmup 2 --threads 8)
[ "$DEVICE" = "cpu" ] && STEP_ARGS=(--device cpu --videos 8 --reps 1 --warmup 0 --threads 2)
[ -n "$RELEASE" ] && STEP_ARGS+=(--release "$RELEASE")
step step 45 "$PY" benchmarks/bench_train_step.py "${STEP_ARGS[@]}"
# 3. the demo pipeline on the device, fp32
step demo_fp32 75 bash -c "demo demo_fp32 fp32"
# 4. one epoch per method on CUDA: bf16, TF32, prefetch, inductor (two methods)
pytest_step tests_train 90 -k "cuda_training" tests
# 5. the demo pipeline in bf16
step demo_bf16 60 bash -c "demo demo_bf16 bf16"
# 6. whole epochs of the train stage (data, steps, validation), ours
EPOCH_ARGS=(--root "$WORK/epoch" --out "$WORK/epoch/results.json" --videos 256,64,128 --epochs 1
            --repeats 1 --only ours)
[ "$DEVICE" = "cpu" ] && EPOCH_ARGS=(--root "$WORK/epoch" --out "$WORK/epoch/results.json" --videos 24,8,8
                                     --epochs 1 --repeats 1 --only ours --threads 2)
if "$PY" benchmarks/bench_epoch.py --help 2>/dev/null | grep -q -- "--device"; then
  EPOCH_ARGS+=(--device "$DEVICE")
fi
step epoch 60 "$PY" benchmarks/bench_epoch.py "${EPOCH_ARGS[@]}"

"$PY" - "$OUT_DIR" "$WORK" "$DEVICE" "$RELEASE" <<'EOF'
import datetime, json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, work, device, release = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs, cmd = line.split("\t", 3)
    steps[name] = {"rc": int(rc), "seconds": round(float(secs), 1), "command": cmd,
                   "timed_out": int(rc) in (124, 137), "skipped": int(rc) == -1,
                   "not_run": "no pytest" if int(rc) == -2 else None}
fig = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "device": device, "torch": torch.__version__,
       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       "release": release or None, "steps": steps}
cases = []  # 1 + 4. the CUDA tests
for xml in ("tests.xml", "tests_train.xml"):
    try:
        root = ET.parse(out / "logs" / xml).getroot()
        cases += (root.find("testsuite") if root.tag == "testsuites" else root).findall("testcase")
    except (OSError, ET.ParseError):
        pass
fig["tests"] = {"collected": len(cases),
                "failed": [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None],
                "skipped": sum(c.find("skipped") is not None for c in cases)}
fig["tests"]["passed"] = len(cases) - len(fig["tests"]["failed"]) - fig["tests"]["skipped"]
rows = []  # 2. step table: videos queries frames | impl | step fwd bwd min cpu | speed-up
for line in (out / "logs" / "step.log").read_text(errors="replace").splitlines():
    m = re.match(r"\s*(\d+)\s+(\d+)\s+(\d+) \|\s*(\w+) \|\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)
    if m:
        v, q, f, impl, *t = m.groups()
        rows.append({"videos": int(v), "queries": int(q), "frames": int(f), "impl": impl,
                     **dict(zip(("step_s", "fwd_loss_s", "bwd_opt_s", "min_s", "cpu_s"), map(float, t)))})
fig["train_step"] = rows
epoch = []  # 3. the epoch benchmark's per-run JSON files
for p in sorted((work / "epoch").glob("*-*.json")):
    try:
        epoch.append({"file": p.name, **json.loads(p.read_text())})
    except (OSError, ValueError):
        pass
fig["epoch"] = {"runs": epoch, "log_tail": (out / "logs" / "epoch.log").read_text(errors="replace").splitlines()[-15:]}
if (work / "epoch" / "results.json").is_file():
    fig["epoch"]["results"] = json.loads((work / "epoch" / "results.json").read_text())
for name in ("demo_fp32", "demo_bf16"):  # 4-5. the demo's test and train metrics
    d = work / name
    rec = {}
    for key, rel in (("test", "metrics/demo/gmmformer_v2/test.json"), ("train", "metrics/demo/gmmformer_v2/train.json")):
        try:
            rec[key] = json.loads((d / rel).read_text())
        except (OSError, ValueError):
            rec[key] = None
    hist = d / "metrics/demo/gmmformer_v2/train_history.csv"
    if hist.is_file():
        import csv
        rec["epoch_time_s"] = [float(r["epoch_time_s"]) for r in csv.DictReader(hist.open())]
    fig[name] = rec
# a step that could not run here (rc -2: no pytest) is named, not counted as a failure
not_run = [n for n, s in steps.items() if s["not_run"]]
fig["ok"] = all(s["rc"] in (0, -2) for s in steps.values()) and not fig["tests"]["failed"]
(out / "gpu_check.json").write_text(json.dumps(fig, indent=1, default=str))
print(f"wrote {out / 'gpu_check.json'}: " + ("every step that ran passed" if fig["ok"] else
      "FAILED: " + ", ".join([n for n, s in steps.items() if s["rc"] not in (0, -2)] + fig["tests"]["failed"]))
      + (f"; not run (no pytest): {', '.join(not_run)}" if not_run else ""))
sys.exit(0 if fig["ok"] else 1)
EOF
rc=$?
rm -rf "$WORK"
exit $rc

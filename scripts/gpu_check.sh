#!/usr/bin/env bash
# The one prepared GPU check (issue #15): everything a GPU must confirm, in < 8 minutes on one GPU.
#
#   scripts/gpu_check.sh [--out DIR] [--work DIR] [--corpus DIR] [--python PY] [--skip STEP[,STEP]]
#                        [--compile] [--dry-run] [-h]
#
# Steps (each under its own time limit; a failing step is recorded and the next one still runs):
#   env        python, torch, the GPU (torch.cuda.is_available() must be true, else the check stops here)
#   cuda_tests pytest -m cuda: the packed varlen flash paths vs the explicit-mask reference (bf16 / fp16),
#              the packed model on CUDA vs padded (fp32) and under bf16 autocast
#   pretrain   50 steps of experiment=pretrain_33m's shape (51M model, L 1,201, batch 32, generative + GEPC +
#              cell prompt, bf16) with trainer=gpu and packed batches, on the small real demo corpus
#   deepspeed  20 steps of the same with trainer=deepspeed_stage2 on one GPU (ZeRO-2)
#   bench      scripts/bench_model.py --device cuda: cells/s, tokens/s, step time, peak memory, TFLOP/s and
#              MFU, padded vs packed, plain vs generative, small and 51M configs
# Output (--out, default $OUT when set, else outputs/gpu_check/<time>): summary.json and summary.md (one record
# per step: command, exit status, seconds, the key figures), bench_model.json and one log per step (8 files at
# most). Run dirs and checkpoints go to --work (default: a temporary directory), not to --out.
# Needs the project's environment (make setup) with a CUDA build of torch; the corpus (default
# .cache/demo_corpus) is built from the real cells shipped with scanpy / celltypist when missing.
set -u -o pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-}"
WORK=""
CORPUS="$ROOT/.cache/demo_corpus"
PY=""
SKIP=""
COMPILE=0
DRY=0
STEPS_GPU="cuda_tests pretrain deepspeed bench"  # env always runs

while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a directory" >&2; exit 2; }; OUT_DIR="$2"; shift 2 ;;
    --work) [ $# -ge 2 ] || { echo "gpu_check: --work needs a directory" >&2; exit 2; }; WORK="$2"; shift 2 ;;
    --corpus) [ $# -ge 2 ] || { echo "gpu_check: --corpus needs a directory" >&2; exit 2; }; CORPUS="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || { echo "gpu_check: --python needs an interpreter" >&2; exit 2; }; PY="$2"; shift 2 ;;
    --skip) [ $# -ge 2 ] || { echo "gpu_check: --skip needs step names" >&2; exit 2; }; SKIP="${2//,/ }"; shift 2 ;;
    --compile) COMPILE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for s in $SKIP; do
  case " $STEPS_GPU " in *" $s "*) ;; *) echo "gpu_check: --skip: no step '$s' (steps: $STEPS_GPU)" >&2; exit 2 ;; esac
done
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || echo python3)"; fi
fi
[ -n "$OUT_DIR" ] || OUT_DIR="$ROOT/outputs/gpu_check/$(date +%Y%m%d-%H%M%S)"
[ -n "$WORK" ] || WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
mkdir -p "$OUT_DIR" "$WORK" || { echo "gpu_check: cannot create $OUT_DIR / $WORK" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
RECORDS="$WORK/records.tsv"
: >"$RECORDS"
export WANDB_MODE=offline TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-8}" PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2

# the common overrides of the pretrain_33m-shaped runs: the paper's model, layout, batch and objective on a small
# corpus; only the lengths of the run (steps, warm-up, the cell-prompt start, validation) are scaled down
RUN_COMMON=(experiment=pretrain_33m logger=csv "paths.corpus=$CORPUS" data.verify=false data.num_workers=4
  model.scheduler.warmup_steps=10 objective.generative.cell_prompt_after_steps=25 trainer.log_every_n_steps=5
  trainer.val_check_interval=25 trainer.limit_val_batches=2 callbacks.periodic_checkpoint.every_n_train_steps=25
  validate_before_fit=false)
[ "$COMPILE" = 1 ] && RUN_COMMON+=(model.compile=true)

# name | time limit (s) | command
STEP_LIMIT_env=30
STEP_LIMIT_cuda_tests=100
STEP_LIMIT_pretrain=110
STEP_LIMIT_deepspeed=100
STEP_LIMIT_bench=130
cmd_env=("$PY" -c "import torch, pytorch_lightning, hydra, deepspeed; ok = torch.cuda.is_available(); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if ok else None); \
raise SystemExit(0 if ok else 3)")
cmd_cuda_tests=("$PY" -m pytest -q -m cuda -p no:cacheprovider tests/)
cmd_pretrain=("$PY" train.py "${RUN_COMMON[@]}" trainer=gpu data.packing=true trainer.max_steps=50
  "hydra.run.dir=$WORK/pretrain")
cmd_deepspeed=("$PY" train.py "${RUN_COMMON[@]}" trainer=deepspeed_stage2 trainer.devices=1 trainer.max_steps=20
  "hydra.run.dir=$WORK/deepspeed")
cmd_bench=("$PY" scripts/bench_model.py --device cuda --configs small,51m --steps 5 --no-official-dropout
  --corpus "$CORPUS" --json "$OUT_DIR/bench_model.json")

quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

run_step() {  # run_step NAME: runs cmd_NAME under its limit, logs to OUT_DIR/NAME.log, appends a record
  local name="$1" limit_var="STEP_LIMIT_$1" cmd_var="cmd_$1[@]"
  local cmd=("${!cmd_var}") limit="${!limit_var}" rc t0 t1
  case " $SKIP " in *" $name "*) printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "$(quote "${cmd[@]}")" >>"$RECORDS"; return 0 ;; esac
  echo "== $name (limit ${limit}s): $(quote "${cmd[@]}")"
  if [ "$DRY" = 1 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" dry-run 0 "$(quote "${cmd[@]}")" >>"$RECORDS"
    return 0
  fi
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "${cmd[@]}" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  tail -n 3 "$OUT_DIR/$name.log" | sed 's/^/   /'
  echo "   -> exit $rc in $((t1 - t0)) s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((t1 - t0))" "$(quote "${cmd[@]}")" >>"$RECORDS"
  return "$rc"
}

echo "gpu_check: out $OUT_DIR, work $WORK, corpus $CORPUS, python $PY"
if [ "$DRY" = 0 ] && [ ! -f "$CORPUS/manifest.json" ]; then
  echo "== corpus: building $CORPUS from the real cells shipped with scanpy / celltypist"
  "$PY" -c "import sys; from data_modules.demo import build_demo_corpus; build_demo_corpus(sys.argv[1])" "$CORPUS" \
    >"$WORK/corpus.log" 2>&1 || { echo "gpu_check: building the corpus failed:" >&2; tail -n 20 "$WORK/corpus.log" >&2; }
fi

status=0
if ! run_step env; then
  status=3
  echo "gpu_check: no usable CUDA environment (see $OUT_DIR/env.log); the GPU steps were not run" >&2
  for s in $STEPS_GPU; do
    var="cmd_$s[@]"
    printf '%s\t%s\t%s\t%s\n' "$s" not-run 0 "$(quote "${!var}")" >>"$RECORDS"
  done
else
  for s in $STEPS_GPU; do
    run_step "$s" || status=1
  done
fi

# summary.json + summary.md: the step records, the bench figures and the training runs' summaries
"$PY" - "$RECORDS" "$OUT_DIR" "$WORK" "$status" "$DRY" <<'PYEOF' || { echo "gpu_check: writing the summary failed" >&2; status=1; }
import json, sys, time
from pathlib import Path

records, out_dir, work, status, dry = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
steps = []
for line in records.read_text().splitlines():
    name, rc, seconds, cmd = line.split("\t", 3)
    steps.append({"step": name, "status": rc if not rc.lstrip("-").isdigit() else ("ok" if rc == "0" else f"exit {rc}"),
                  "seconds": int(seconds), "command": cmd})
summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": dry, "exit_status": status, "steps": steps}
env_log = out_dir / "env.log"
if env_log.exists():
    summary["environment"] = env_log.read_text().strip().splitlines()[-1:]
for run in ("pretrain", "deepspeed"):
    s = work / run / "summary.json"
    if s.exists():
        summary[run] = json.loads(s.read_text())
bench = out_dir / "bench_model.json"
if bench.exists():
    b = json.loads(bench.read_text())
    summary["bench"] = {k: b.get(k) for k in ("gpu", "peak_bf16_flops", "packed_vs_padded", "mfu_bf16", "pad_fraction")}
    summary["bench"]["rows"] = [
        {k: r.get(k) for k in ("config", "impl", "attention", "layout", "batch", "step_s", "cells_per_s",
                               "tokens_per_s", "tflops_per_s", "mfu", "mem_mb")}
        for r in b.get("rows", [])
    ]
(out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
md = [f"# GPU check {summary['date']}", "", f"exit status {status}" + (" (dry run)" if dry else ""), "",
      "| step | status | seconds | command |", "|---|---|---|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} | `{s['command']}` |" for s in steps]
if "environment" in summary:
    md += ["", "environment: " + " ".join(summary["environment"])]
for run in ("pretrain", "deepspeed"):
    if run in summary:
        r = summary[run]
        md += ["", f"{run}: " + ", ".join(f"{k} {r[k]}" for k in r if not isinstance(r[k], (dict, list)))]
if "bench" in summary:
    md += ["", f"bench_model.py --device cuda on {summary['bench']['gpu']}:", "",
           "| config | impl | attention | layout | batch | s/step | cells/s | tok/s | TFLOP/s | MFU | peak MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["bench"]["rows"]:
        mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        md.append(f"| {r['config']} | {r['impl']} | {r['attention']} | {r['layout']} | {r['batch']} | {r['step_s']:.4f} | "
                  f"{r['cells_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops_per_s']:.1f} | {mfu} | {r['mem_mb']:.0f} |")
    md += ["", f"packed vs padded: {summary['bench'].get('packed_vs_padded')}",
           f"pad fraction (real corpus): {summary['bench'].get('pad_fraction')}"]
(out_dir / "summary.md").write_text("\n".join(md) + "\n")
print(f"gpu_check: summary in {out_dir / 'summary.json'} and {out_dir / 'summary.md'}")
PYEOF
exit "$status"

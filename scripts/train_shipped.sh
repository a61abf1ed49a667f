#!/usr/bin/env bash
# Trains every shipped model and baseline, then writes each report next to its checkpoint.
# Resumable: rerun after an interruption and finished runs are skipped, unfinished ones resume.
# Two queues run side by side with one thread each (on 2 cores, more total throughput than one
# queue with two threads).   Usage: scripts/train_shipped.sh [A|B|all]   logs: runs/*.log
# A queue stops at its first failed run (the other queue carries on); the exit status is non-zero if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

usage() {
  echo "usage: scripts/train_shipped.sh [A|B|all]   (default all: queues A and B side by side; logs in runs/)"
}

run() {  # run NAME OUT ARGS... : train unless OUT exists, then evaluate into OUT's .json
  local name=$1 out=$2 rc=0; shift 2
  if [[ ! -f $out ]]; then
    $PY -m training train "$@" threads=1 out="$out" >>"runs/$name.log" 2>&1 || rc=$?
  fi
  if ((rc == 0)); then
    $PY -m training evaluate "$out" --json "${out%.safetensors}.json" >>"runs/$name.log" 2>&1 || rc=$?
  fi
  if ((rc != 0)); then
    echo "train_shipped.sh: $name failed (exit $rc); see runs/$name.log, then rerun to resume" >&2
    return "$rc"
  fi
}

queue_a() {
  run structured_line models/structured_line.safetensors configs/structured_line.yaml
  run unstructured_line models/unstructured_line.safetensors configs/unstructured_line.yaml
  # structured_a1.0, width 1, is the plain uncompressed network: every kind's fp32 baseline
  for a in 1.0 0.0 0.5; do
    run "structured_a$a" "models/baselines/structured_a$a.safetensors" configs/structured_line.yaml fixed_alpha=$a
  done
  run quantized_a0.0 models/baselines/quantized_a0.0.safetensors configs/quantized_line.yaml fixed_alpha=0.0
}

queue_b() {
  run quantized_line models/quantized_line.safetensors configs/quantized_line.yaml
  run quantized_point models/quantized_point.safetensors configs/quantized_point.yaml
  for a in 0.025641 0.5; do
    run "unstructured_a$a" "models/baselines/unstructured_a$a.safetensors" configs/unstructured_line.yaml fixed_alpha=$a
  done
  run quantized_a0.5 models/baselines/quantized_a0.5.safetensors configs/quantized_line.yaml fixed_alpha=0.5
}

if (($# > 1)); then
  usage >&2
  exit 2
fi
case ${1:-all} in
  A | B | all) ;;
  -h | --help)
    usage
    exit 0
    ;;
  *)
    echo "train_shipped.sh: unknown argument '$1'" >&2
    usage >&2
    exit 2
    ;;
esac
mkdir -p runs models/baselines
case ${1:-all} in
  A) queue_a ;;
  B) queue_b ;;
  all)  # a bare `wait` returned 0 whatever the queues did: wait for each and keep the worst status
    queue_a &
    a=$!
    queue_b &
    b=$!
    rc=0
    wait "$a" || rc=$?
    wait "$b" || rc=$?
    exit "$rc"
    ;;
esac

#!/usr/bin/env bash
# Every experiment of docs/results.md, then the page itself. Four lanes run side by side, one
# torch thread each (the machine has 2 cores; the vision lane is short); each lane's steps run in
# order. Scenarios are built on first use (see docs/scenarios.md); raw results go to
# docs/results/raw/, figures to docs/results/.
#   bash experiments/run_all.sh            (about 2 hours on 2 cores once the scenarios are built)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-docs/results/raw}
export OMP_NUM_THREADS=1
mkdir -p "$OUT" logs
T1="$PY experiments/table1.py --threads 1 --out $OUT"
ST="$PY experiments/studies.py --threads 1 --out $OUT"

AC="$PY experiments/autochoice.py --threads 1 --out $OUT"

lane_short() {
  $T1 --scenario text-release-short
  $AC --scenario text-release-short
  $ST masks --scenario text-release-short
  $ST subsets --scenario text-release-short --k 2
  $ST agreement --scenario text-release-short
  $T1 --scenario text-release-short --target A --tasks headlines --ks 1 2 5 --no-fewshot --no-skill
  $AC --scenario text-release-short --target A --tasks headlines
}

lane_long() {
  $T1 --scenario text-release-long
  $AC --scenario text-release-long
  $ST multisource --scenario text-release-long
  $ST agreement --scenario text-release-long
  $ST multitask --scenario text-release-long
}

lane_far() {
  $T1 --scenario text-release-far --tasks headlines --ks 1 2 5
  $PY experiments/estimators.py --threads 1 --out $OUT --scenario text-release-far --tasks headlines
  $AC --scenario text-release-far --tasks headlines --rules no-harm --references none \
    --name floors-text-release-far-headlines
}

lane_vision() {
  $T1 --scenario vision-independent --ks 1 2 5 10 20
  $AC --scenario vision-independent
  for study in masks agreement multitask; do $ST $study --scenario vision-independent; done
  $ST subsets --scenario vision-independent --k 2
  $PY experiments/crosswidth.py --out "$OUT"
}

lane_short > logs/results-short.log 2>&1 &
short=$!
lane_long > logs/results-long.log 2>&1 &
long=$!
lane_vision > logs/results-vision.log 2>&1 &
vision=$!
lane_far > logs/results-far.log 2>&1 &
far=$!
wait $short
wait $long
wait $vision
wait $far
$PY experiments/costs.py --out "$OUT" --threads 2
$PY experiments/report.py --raw "$OUT" --out docs/results.md

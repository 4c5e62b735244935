#!/usr/bin/env bash
# The default `gradfix transport` (shots only, no --validation) on a text scenario's headlines
# task, k = 2 and 5 shots per class (k = 1 cannot be cross-validated on the shots: the command
# refuses it without --validation), seeds 0-2; each output scored on the test split with
# `gradfix eval`. One line per run: accuracy, whether τ_A was aligned by re-basin, the verdict, where
# the signs came from (votes, or a fine-tune of B on the shots: --signs auto on a weak verdict), t, α.
#   bash experiments/cli_default.sh text-release-permuted > docs/results/raw/cli-default-text-release-permuted.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GRADFIX=${GRADFIX:-.venv/bin/gradfix}
SCENARIO=${1:-text-release-permuted}
S=$($GRADFIX zoo path "$SCENARIO")
T='This news article is about {label}.'
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "command: bash experiments/cli_default.sh $SCENARIO"
# the build the runs use: B's drift from A over the transported tensors (builds of a recipe can differ)
echo "drift: $(PYTHONPATH=experiments $PY -c "import sys; from pathlib import Path; from envs import relative_drift; print(relative_drift(Path(sys.argv[1]), 'encoder.*'))" "$S")"
for k in 2 5; do
  for seed in 0 1 2; do
    out="$WORK/k$k-s$seed"
    $GRADFIX transport --source-base "$S/A" --source-finetuned "$S/A-ft/headlines" --target-base "$S/B" \
      --data "$S/data/headlines/train.jsonl" --shots "$k" --seed "$seed" --include 'encoder.*' \
      --template "$T" --max-length 24 --no-progress --out "$out" > /dev/null
    acc=$($GRADFIX eval --model "$out" --data "$S/data/headlines/test.jsonl" --template "$T" \
      --max-length 24 --json | $PY -c "import json, sys; print(round(json.load(sys.stdin)['accuracy'], 4))")
    $PY - "$out/gradfix.json" "$k" "$seed" "$acc" <<'PYEOF'
import json, sys
record = json.load(open(sys.argv[1], encoding="utf-8"))
choice, check = record.get("choice", {}), record.get("check", {})
signs = (record.get("signs") or {}).get("from", "votes")
print(f"k={sys.argv[2]} seed={sys.argv[3]} test_accuracy={sys.argv[4]} aligned_by={record.get('aligned_by')} "
      f"verdict={check.get('verdict')} signs={signs} t={choice.get('threshold')} alpha={choice.get('alpha')}")
PYEOF
  done
done

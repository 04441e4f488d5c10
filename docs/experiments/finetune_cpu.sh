#!/usr/bin/env bash
# The fine-tuning figures in docs/finetuning.md: full-size T3 (random weights: timings and
# memory are real, the voice is not) on this machine, 5 steps of each method on the
# espeak-ng demo dataset, then a fine-tuned voice against the same speaker as a clip.
# Run from the repository root: bash docs/experiments/finetune_cpu.sh [WORKDIR]
set -euo pipefail
work=${1:-/tmp/finetune-cpu}
export CHATTERBOX_DEMO_CACHE="$work/cache"
py=.venv/bin/python
# demo-data writes only into a new folder: a second run reuses the first one's clips.
[ -d "$work/data" ] || $py -m chatterbox_demo finetune demo-data "$work/data" --clips 12
for method in lora speaker-adapter full; do
  /usr/bin/time -f "$method peak RSS %M KB, wall %e s" \
    $py -m chatterbox_demo finetune train "$work/data" --weights random --out "$work/$method" \
      --method "$method" --steps 5 --batch 1 --json > "$work/$method.json" 2> "$work/$method.log"
  tail -n 1 "$work/$method.log"
  $py -c "import json,sys; c=json.load(open(sys.argv[1])); print({k: c[k] for k in ('method','train_seconds','train_loss_first','train_loss_final','val_loss')})" "$work/$method.json"
done
du -sh "$work"/lora/adapter.safetensors "$work"/speaker-adapter/speaker_offset.safetensors \
  "$work"/full/t3_cfg.safetensors
reference=$($py -c "import json,sys; print(json.load(open(sys.argv[1]))['reference'])" "$work/lora/card.json")
$py -m chatterbox_demo finetune import "$work/lora" --weights random --name tuned-lora
$py -m chatterbox_demo voices add same-speaker "$work/data/$reference" --weights random
$py -m chatterbox_demo bench --weights random --presets cached,cpu-fast \
  --voices tuned-lora,same-speaker --tokens 100 --no-fidelity --markdown "$work/bench.md" \
  --json "$work/bench.json" > /dev/null
cat "$work/bench.md"

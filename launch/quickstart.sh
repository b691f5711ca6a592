#!/usr/bin/env bash
# README command 1 — the main job on the embedded default, on any Linux machine (CPU or GPU):
#   1. set up .venv and install reformer-dist
#   2. prepare a byte-level corpus from the Python standard library's own source files
#   3. train the tiny Reformer with the DeepSpeed launcher (all local GPUs, or two CPU ranks): validation
#      bits/byte at step 0 and every 100 steps, a generated sample every 250
#   4. export it to ONNX and check the graph
#   5. generate a sample with ONNX Runtime (the prompt, then the continuation) and print the validation
#      bits/byte before and after training
# Extra key=value arguments are passed to training, e.g. `bash launch/quickstart.sh train.max_steps=50`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup_env.sh
source .venv/bin/activate
export WANDB_MODE="${WANDB_MODE:-offline}"

run_dir=runs/tiny
data_dir=runs/data/stdlib

echo "== 1/4 prepare data: Python standard library -> $data_dir"
if [ ! -f "$data_dir/manifest.json" ]; then
  reformer-dist prepare-data --input stdlib --output "$data_dir"
else
  echo "   (already prepared)"
fi

# One rank per GPU; on a CPU-only machine two gloo ranks (one thread each) when there are >= 2 cores.
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
cores=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
ranks=$(( gpus > 0 ? gpus : (cores >= 2 ? 2 : 1) ))
[ "$gpus" -gt 0 ] || export OMP_NUM_THREADS=$(( cores / ranks ))
echo "== 2/4 train: deepspeed --num_gpus $ranks --module reformer_dist train --config tiny"
deepspeed --num_gpus "$ranks" --module reformer_dist train --config tiny \
  data.path="$data_dir" train.output_dir="$run_dir" "$@"

echo "== 3/4 export: $run_dir -> $run_dir/model.onnx"
reformer-dist export onnx --checkpoint "$run_dir" --output "$run_dir/model.onnx" --generation
reformer-dist export check "$run_dir/model.onnx" --target onnxruntime

echo "== 4/4 generate with ONNX Runtime (top-k 40, temperature 0.8): the prompt, then the model's continuation"
prompt="def "
printf '%s' "$prompt"
reformer-dist generate --model "$run_dir/model.onnx" --prompt "$prompt" --max-new-tokens 300 --temperature 0.8 --top-k 40 --seed 0
echo
python - "$run_dir/metrics.jsonl" <<'PY'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "val_bpb" in r]
if evals:  # the first evaluation is the untrained model's (step 0)
    print(f"validation bits/byte: {evals[0]['val_bpb']:.3f} before training (step {evals[0]['step']}), "
          f"{evals[-1]['val_bpb']:.3f} after step {evals[-1]['step']}")
PY

echo
echo "Outputs:"
echo "  prepared data      $data_dir/ (manifest.json + token shards)"
echo "  run directory      $run_dir/ (config.yaml, ds_config.json, metrics.jsonl, checkpoints, latest)"
echo "  consolidated model $run_dir/native/ (model.safetensors + config.yaml)"
echo "  ONNX model         $run_dir/model.onnx"
if [ "$WANDB_MODE" = offline ]; then
  echo "  W&B offline run    $run_dir/wandb/offline-run-* (upload: wandb sync $run_dir/wandb/offline-run-*)"
fi

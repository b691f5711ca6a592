#!/usr/bin/env bash
# Train on one machine with the DeepSpeed launcher: one rank per GPU, or NUM_GPUS gloo ranks on a CPU-only box.
#   bash launch/train_single_node.sh CONFIG [key=value ...]
#   NUM_GPUS=4 bash launch/train_single_node.sh base train.max_steps=1000
# Environment: NUM_GPUS (default: all visible GPUs, 1 without a GPU), MASTER_PORT (default 29500).
# Re-running the same command resumes from the run directory's `latest` checkpoint (train.resume=auto).
set -euo pipefail
config="${1:?usage: train_single_node.sh CONFIG [key=value ...]}"
shift
gpus="${NUM_GPUS:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
exec deepspeed --num_gpus "$gpus" --master_port "${MASTER_PORT:-29500}" \
  --module reformer_dist train --config "$config" "$@"

#!/usr/bin/env bash
# Train on several nodes listed in a DeepSpeed hostfile (see launch/hostfile.example).
#
# With passwordless ssh between nodes: run once, on the first node. DeepSpeed starts every node over pdsh
# and forwards the NCCL_*/PYTHON*/... variables listed in ~/.deepspeed_env:
#   HOSTFILE=hosts bash launch/train_multi_node.sh CONFIG [key=value ...]
#
# Without ssh (containers, clusters that forbid it): run the same command on every node, each with its
# NODE_RANK (its line in the hostfile, from 0) and the first node's address:
#   HOSTFILE=hosts NODE_RANK=1 MASTER_ADDR=node-001 bash launch/train_multi_node.sh CONFIG [key=value ...]
#
# Environment: HOSTFILE (required), NODE_RANK (no-ssh mode), MASTER_ADDR (default: the first host),
# MASTER_PORT (default 29500). All nodes must see the same data.path and train.output_dir (shared FS).
set -euo pipefail
config="${1:?usage: HOSTFILE=... [NODE_RANK=...] train_multi_node.sh CONFIG [key=value ...]}"
shift
hostfile="${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile}"
master="${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")}"
launcher=(deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}")
if [ -n "${NODE_RANK:-}" ]; then
  launcher+=(--no_ssh --node_rank "$NODE_RANK")
fi
exec "${launcher[@]}" --module reformer_dist train --config "$config" "$@"

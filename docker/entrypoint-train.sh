#!/usr/bin/env bash
# `sshd` as the command turns a container into a multi-node worker reachable by DeepSpeed's pdsh launcher;
# anything else is executed as given (e.g. `deepspeed --num_gpus 8 --module reformer_dist train ...`).
set -euo pipefail
if [ "${1:-}" = "sshd" ]; then
  ssh-keygen -A >/dev/null
  exec /usr/sbin/sshd -D -e
fi
exec "$@"

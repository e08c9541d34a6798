#!/usr/bin/env bash
# Launch `megaflow train` on one or more nodes through the DeepSpeed launcher.
#
#   launch/train.sh --config tiny --set parallel.zero_stage=3             # all GPUs of this node
#   launch/train.sh --config my_recipe.yaml --set parallel.sp_size=4 --set parallel.zero_stage=3
#   HOSTFILE=launch/hostfile NUM_GPUS=8 launch/train.sh --config ... --resume auto
#   NO_SSH=1 NODE_RANK=1 MASTER_ADDR=node-01 HOSTFILE=... launch/train.sh ...   # run on every node yourself
#
# Environment: HOSTFILE (multi-node), NUM_GPUS (per node; default: all), MASTER_ADDR, MASTER_PORT
# (default 29500), NO_SSH=1 with NODE_RANK (start each node by hand, no pdsh/ssh), DEEPSPEED
# (launcher command, default "deepspeed"). Everything else is passed to `megaflow train`.
set -euo pipefail

args=()
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "launch/train.sh: HOSTFILE=$HOSTFILE does not exist (see launch/hostfile.example)" >&2; exit 2; }
  args+=(--hostfile "$HOSTFILE")
fi
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
args+=(--master_port "${MASTER_PORT:-29500}")
if [[ "${NO_SSH:-0}" == "1" ]]; then
  [[ -n "${NODE_RANK:-}" ]] || { echo "launch/train.sh: NO_SSH=1 needs NODE_RANK (0 on the master node)" >&2; exit 2; }
  args+=(--no_ssh --node_rank "$NODE_RANK")
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
exec ${DEEPSPEED:-deepspeed} "${args[@]}" --module megaflow train "$@"

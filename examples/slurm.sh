#!/bin/bash
# QLoRA on several nodes with slurm: one srun task per node runs torchrun, which starts one process
# per GPU; torchrun's c10d rendezvous on the first node joins the nodes. --out_dir must be on a
# filesystem every node shares (checked at startup); the token cache too, or pass --data_cache=<a
# node-local folder> and each node tokenizes once for itself.
#
#   sbatch --nodes=2 examples/slurm.sh --model=/shared/llama-3-8b --data=/shared/data.jsonl --out_dir=/shared/runs/a
#
# Preemption and time limits: slurm sends SIGTERM to every task (torchrun passes it on to its ranks)
# and SIGKILL KillWait seconds later (30 by default); every rank saves at the next step boundary and
# stops. The same command with --resume continues, at this node count or another (keep the global
# batch with --grad_accum). A node that dies stops the others within --timeout, with one line naming
# the step; resume from the last --save_every checkpoint.
#SBATCH --job-name=finetune
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --requeue
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus=${SLURM_GPUS_ON_NODE:-8}
# Hybrid sharding groups each node's GPUs (LOCAL_WORLD_SIZE) by default: weights are sharded within
# a node over NVLink and replicated across nodes, so only gradients cross the slower network.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$gpus" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_node:${MASTER_PORT:-29500}" \
    train.py --adapter=lora --quant=nf4 --fsdp --shard=hybrid --grad_checkpointing --save_every=100 "$@"

#!/usr/bin/env bash
# llama-gen on two nodes with plain torchrun. Start it on both nodes with the same HEAD (the
# first node's hostname) and PORT, and NODE_RANK 0 on HEAD, 1 on the other node:
#
#   node0$ HEAD=node0 PORT=23456 NODE_RANK=0 GPUS=8 scripts/two_nodes.sh
#   node1$ HEAD=node0 PORT=23456 NODE_RANK=1 GPUS=8 scripts/two_nodes.sh
#
# Words after the script's name are llama-gen flags (`scripts/two_nodes.sh --num_samples 4`).
# CKPT_DIR, PROMPTS and OUT must name the same files on both nodes, on a filesystem both share;
# OUT's folder above all: each replica appends its lines to OUT.parts/, and rank 0 merges them
# into OUT. Both nodes need llama-gen on their PATH.
#
# A static rendezvous, as in the Slurm script (not c10d): node rank 0's torchrun holds the only
# store, at HEAD:PORT, and global rank 0 (the merge, the progress bar, the summary) is on HEAD.
# If PORT is taken on HEAD, node 0 stops at once, where a c10d rendezvous would quietly use
# whatever listens there (another job's store). There is no default PORT: a second job started
# with the first one's would reach its store. Give each job its own free port on HEAD, below
# 32768 (Linux hands out the ports above to outgoing connections).
#
# Resume: if a node dies, or the run is stopped, run the same two commands again. Every
# (prompt, sample) comes out exactly once.
#
# Dry run on one machine: two "nodes" on its CPU, with a tiny checkpoint (HEAD=localhost, one
# process per "node", so two replicas of a 1-shard model):
#
#   python scripts/make_tiny_model.py /tmp/tiny
#   printf '{"prompt": "Hello %s"}\n' 1 2 3 4 5 6 > /tmp/prompts.jsonl
#   export CKPT_DIR=/tmp/tiny PROMPTS=/tmp/prompts.jsonl OUT=/tmp/out.jsonl HEAD=localhost \
#       PORT=23456 GPUS=1
#   NODE_RANK=0 scripts/two_nodes.sh --device cpu & NODE_RANK=1 scripts/two_nodes.sh --device cpu; wait
set -euo pipefail

: "${HEAD:?set HEAD to the hostname of the node with NODE_RANK=0 (localhost for a dry run on one machine)}"
: "${PORT:?set PORT to a free TCP port on HEAD below 32768, the same on both nodes, one per job}"
: "${NODE_RANK:?set NODE_RANK to 0 on HEAD and 1 on the other node}"
CKPT_DIR=${CKPT_DIR:-llama-2-13b}
PROMPTS=${PROMPTS:-prompts.jsonl}
OUT=${OUT:-out.jsonl}
GPUS=${GPUS:-8}                              # processes (GPUs) per node
MODEL_PARALLEL_SIZE=${MODEL_PARALLEL_SIZE:-1} # GPUs per model copy: 1 for 7B/8B, 2 for 13B, 8 for 70B

if [[ $NODE_RANK != [01] ]]; then
    echo "two_nodes.sh: NODE_RANK=$NODE_RANK: use 0 on HEAD and 1 on the other node" >&2
    exit 2
fi
if (( GPUS % MODEL_PARALLEL_SIZE != 0 )); then  # a model copy split across nodes would be slow
    echo "two_nodes.sh: GPUS=$GPUS is not a multiple of MODEL_PARALLEL_SIZE=$MODEL_PARALLEL_SIZE:" \
        "keep each model copy inside one node" >&2
    exit 2
fi

# --max_restarts 0: an incomplete run exits non-zero for you to see; run the commands again
# (restarts in place are not tested, and cannot rejoin a node that died).
exec torchrun --nnodes 2 --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
    --master_addr "$HEAD" --master_port "$PORT" --max_restarts 0 \
    --no-python llama-gen --ckpt_dir "$CKPT_DIR" --prompt_path "$PROMPTS" --out_path "$OUT" \
    --model_parallel_size "$MODEL_PARALLEL_SIZE" "$@"

#!/usr/bin/env bash
# llama-gen on two nodes with plain torchrun (c10d rendezvous). Start the same command on both
# nodes, with HEAD the first node's hostname (its torchrun hosts the rendezvous):
#
#   node0$ HEAD=node0 GPUS=8 scripts/two_nodes.sh
#   node1$ HEAD=node0 GPUS=8 scripts/two_nodes.sh
#
# Words after the script's name are llama-gen flags (`scripts/two_nodes.sh --num_samples 4`).
# CKPT_DIR, PROMPTS and OUT must name the same files on both nodes, on a filesystem both share;
# OUT's folder above all: each replica appends its lines to OUT.parts/, and rank 0 merges them
# into OUT. The c10d rendezvous numbers the nodes itself (torchrun ignores --node_rank with it),
# so global rank 0, which merges and shows the progress, may be on either node. Both nodes need
# llama-gen on their PATH.
#
# Resume: if a node dies, or the run is stopped, run the same two commands again. Every
# (prompt, sample) comes out exactly once.
#
# Dry run on one machine: two "nodes" on its CPU, with a tiny checkpoint (HEAD=localhost, one
# process per "node", so two replicas of a 1-shard model):
#
#   python scripts/make_tiny_model.py /tmp/tiny
#   printf '{"prompt": "Hello %s"}\n' 1 2 3 4 5 6 > /tmp/prompts.jsonl
#   export CKPT_DIR=/tmp/tiny PROMPTS=/tmp/prompts.jsonl OUT=/tmp/out.jsonl HEAD=localhost GPUS=1
#   scripts/two_nodes.sh --device cpu & scripts/two_nodes.sh --device cpu; wait
set -euo pipefail

: "${HEAD:?set HEAD to the hostname of the first node (localhost for a dry run on one machine)}"
CKPT_DIR=${CKPT_DIR:-llama-2-13b}
PROMPTS=${PROMPTS:-prompts.jsonl}
OUT=${OUT:-out.jsonl}
GPUS=${GPUS:-8}                              # processes (GPUs) per node
MODEL_PARALLEL_SIZE=${MODEL_PARALLEL_SIZE:-1} # GPUs per model copy: 1 for 7B/8B, 2 for 13B, 8 for 70B
PORT=${PORT:-29500}                          # a free TCP port on HEAD
RUN_ID=${RUN_ID:-llama-gen-two-nodes}        # the same on both nodes; another for a second job

if (( GPUS % MODEL_PARALLEL_SIZE != 0 )); then  # a model copy split across nodes would be slow
    echo "two_nodes.sh: GPUS=$GPUS is not a multiple of MODEL_PARALLEL_SIZE=$MODEL_PARALLEL_SIZE:" \
        "keep each model copy inside one node" >&2
    exit 2
fi

exec torchrun --nnodes 2 --nproc_per_node "$GPUS" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" --rdzv_id "$RUN_ID" \
    --no-python llama-gen --ckpt_dir "$CKPT_DIR" --prompt_path "$PROMPTS" --out_path "$OUT" \
    --model_parallel_size "$MODEL_PARALLEL_SIZE" "$@"

#!/usr/bin/env bash
# bench_memory on a 4-GPU machine, one process per GPU at a time (Llama-3.1-8B shape):
#   bash bench/run_memory_suite.sh [CAP_GIB]
# CAP_GIB caps each process's GPU memory (79 emulates an 80 GB H100 on an H200; say so when quoting).
set -u
cap=${1:-}
capflag=${cap:+--cap-gib $cap}
m="python -m bench.bench_memory"
(CUDA_VISIBLE_DEVICES=0 $m --variant hf --lengths 8192 16384 $capflag;
 CUDA_VISIBLE_DEVICES=0 $m --variant offload --lengths 8192 16384 $capflag) > /tmp/mem0.log 2>&1 &
(CUDA_VISIBLE_DEVICES=1 $m --variant tiled_loss --lengths 8192 16384 $capflag;
 CUDA_VISIBLE_DEVICES=1 $m --variant tiled_mlp --lengths 8192 16384 $capflag;
 CUDA_VISIBLE_DEVICES=1 $m --variant tiled_loss --layers 8 --lengths 131072;
 CUDA_VISIBLE_DEVICES=1 $m --variant all --layers 8 --lengths 131072) > /tmp/mem1.log 2>&1 &
(CUDA_VISIBLE_DEVICES=2 $m --variant all --lengths 8192 16384 $capflag;
 CUDA_VISIBLE_DEVICES=2 $m --variant all --lengths 65536 --timed-steps 0 $capflag;
 CUDA_VISIBLE_DEVICES=2 $m --variant all --layers 8 --lengths 65536 --timed-steps 0 $capflag) > /tmp/mem2.log 2>&1 &
(CUDA_VISIBLE_DEVICES=3 $m --variant all --layers 2 --ballast-layers 30 --lengths 131072 262144 524288 --timed-steps 0 $capflag) > /tmp/mem3.log 2>&1 &
wait
grep -h -v "^{" /tmp/mem?.log | grep -v -i warn

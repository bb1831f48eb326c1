#!/bin/bash
# One device call on nvidia-h100-x4 (issue #4, target (3) "10x HF's faster path on the same requests"):
#   GPU 0      GPU kernel tests, then bench/gpu_bench.py copy,engine: kvmesh on all 1,000 mixed
#              requests (and 512 x 128, single stream, TTFT, decode profiles, GEMV tuning table)
#   GPUs 1-3   bench/hf_mixed.py: HF static cache, batch 32, on the same 1,000 requests, a third
#              of the batches each; merged, their seconds add up to one GPU's time for the set
set -u
source bench/device/env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv > $L/nvidia_smi.txt 2>&1
python3 -c "from bench.gpu_bench import make_dummy_checkpoint as m; m('/tmp/kvmesh-llama8b-dummy')"
for i in 0 1 2; do
  ( CUDA_VISIBLE_DEVICES=$((i + 1)) timeout "${HF_S:-480}" python3 bench/hf_mixed.py run --shard $i/3 \
      --out "$OUT/hf_shard$i.json" > $L/hf_shard$i.log 2>&1 ) &
done
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py > $L/kernel_tests.txt 2>&1
  timeout "${ENGINE_S:-360}" python3 bench/gpu_bench.py --parts copy,engine --max-num-seqs 512 \
      --decode-profile --profile-dir $L --out "$OUT/gpu_bench_engine.json" > $L/gpu_bench.log 2>&1
) &
wait
tail -3 $L/kernel_tests.txt
grep "\[gpu_bench\]" $L/gpu_bench.log | tail -12
grep -iE "microseconds a call" $L/gpu_bench.log | tail -1 | cut -c1-1500
tail -2 $L/hf_shard*.log
python3 bench/hf_mixed.py merge "$OUT"/hf_shard*.json --engine "$OUT/gpu_bench_engine.json" --out "$OUT/hf_mixed.json" \
    | grep -E "complete|num_batches|output_tok_s|seconds_one_gpu|kvmesh_over_hf"
head -3 $L/profile_b1.txt
tar -czf "$OUT/logs.tgz" -C /tmp logs

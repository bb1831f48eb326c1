#!/bin/bash
# One device call on nvidia-h200 (#5, stop 22): stop 21's review refactor of the pushing GEMV
# (never run on a GPU) and the LM head at batch 1 going through gemv.linear (tuned against
# cuBLAS): the single-GPU kernel, engine and LL loopback tests, the TP=1 8B decode step with its
# tuner report (the 128256x4096 LM head's row), and bench/push_gemv.py's chain A/B.
set -u
source bench/device/env.sh
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=index,name --format=csv,noheader
gpu_tests single_gpu 330 -m "gpu and not multigpu and not multigpu4" tests/gpu/test_kernels.py \
    tests/gpu/test_engine_gpu.py tests/gpu/test_no_recompile.py tests/gpu/test_ll_loopback.py
decode_step tp1 1 0
python3 - <<'PY'
# the tuner's choice for the 8B LM head alone, at TP=1 and TP=2 shapes (µs a call in a CUDA graph)
import json, torch
from engine.kernels import gemv_tune
from engine.models.layers import ParallelLMHead
for tp in (1, 2):  # a TP=2 rank's head is the (vocab / 2, hidden) shard: the same shape at tp 1
    head = ParallelLMHead(-(-128256 // tp), 4096).to("cuda", torch.bfloat16)
    print("lm head tp", tp, json.dumps(gemv_tune.tune(head)))
PY
timeout 150 python3 bench/push_gemv.py --out $OUT/push_gemv_h200.json 2>&1 | tail -8

"""The LL all-reduce's shape rule (engine/distributed/ll_allreduce.py ``rows_and_lines``), on the CPU.

Every rank must pick the same path from shape and dtype alone, so this pure function decides
it: (rows, 8-byte lines per row), lines -1 where a row is not whole lines. The kernel itself
runs on GPUs (tests/gpu/test_ll_allreduce.py)."""

from __future__ import annotations

import pytest
import torch

from engine.distributed.ll_allreduce import rows_and_lines


@pytest.mark.parametrize("shape,dtype,expected", [
    ((1, 4096), torch.bfloat16, (1, 1024)),
    ((32, 5120), torch.float16, (32, 1280)),
    ((2, 3, 64), torch.float32, (6, 32)),
    ((32768,), torch.bfloat16, (1, 8192)),  # a flat tensor is one row
    ((4, 6), torch.bfloat16, (4, -1)),  # 12 bytes a row: not whole lines
    ((), torch.float32, (1, -1)),
])
def test_rows_and_lines(shape, dtype, expected):
    assert rows_and_lines(shape, dtype) == expected

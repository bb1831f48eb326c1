"""Compile the Triton kernels for sm_90 on a machine without a GPU, and report resources.

Catches compile errors and shows registers / spills / shared memory (through the
cuobjdump bundled with Triton) before any device time is spent::

    python -m tests.gpu.aot_compile
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
        torch.int32: "*i32", torch.int64: "*i64"}


def compile_kernel(fn, args: dict, num_warps: int = 4, num_stages: int = 2):
    """args: name -> torch dtype (pointer), int (i32 or i64), float (fp32), or a constexpr value
    wrapped as ("constexpr", value). Returns the compiled kernel."""
    signature, constexprs, attrs = {}, {}, {}
    no_spec = set(getattr(fn, "do_not_specialize", ()))
    defaults = {name: p.default for name, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for index, name in enumerate(fn.arg_names):
        value = args[name] if name in args else ("constexpr", defaults[name])  # e.g. PDL=False
        if isinstance(value, tuple) and value[0] == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = value[1]
        elif isinstance(value, torch.dtype):
            signature[name] = _PTR[value]
            attrs[(index,)] = [["tt.divisibility", 16]]  # as the JIT does for 16-byte-aligned pointers
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
            if value % 16 == 0 and name not in no_spec and index not in no_spec:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: {value!r}")
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
    lines = [line.strip() for line in res.stdout.splitlines() if "REG" in line]
    return lines[0] if lines else res.stdout + res.stderr


def C(v):
    return ("constexpr", v)


def main() -> None:
    from engine.attention import cache_store as cs
    from engine.attention import triton_kernels as tk
    from engine.kernels import triton_ops as ko
    dt = torch.bfloat16
    for hd, group, bs in [(128, 4, 16), (128, 8, 16), (64, 1, 32), (64, 4, 64)]:
        common = dict(q_ptr=dt, k_cache_ptr=dt, v_cache_ptr=dt, block_tables_ptr=torch.int32,
                      seq_lens_ptr=torch.int32, query_start_ptr=torch.int32, out_ptr=dt,
                      scale_log2=0.1, stride_qt=4096, stride_qh=128, stride_ot=4096, stride_oh=128,
                      stride_cache_slot=1024, stride_cache_head=128, stride_bt=64,
                      GROUP=C(group), HEAD_DIM=C(hd), DIM_PAD=C(hd), BLOCK_SIZE=C(bs),
                      DOT_PRECISION=C("tf32"), OFFSET_64=C(False))
        for split in (False, True):
            k = compile_kernel(tk._decode_kernel, dict(
                common, part_out_ptr=torch.float32, part_lse_ptr=torch.float32, num_splits=3,
                NUM_Q_HEADS=C(8 * group), GROUP_PAD=C(max(16, group)), BLOCK_N=C(64),
                IS_SPLIT=C(split), MIN_SPLIT_LEN=C(256), PDL=C(split)))
            ptx = k.asm["ptx"]
            before = ptx.split("griddepcontrol.wait")[0] if "griddepcontrol.wait" in ptx else ""
            # the lengths, the block table and the first tile's older K/V: loaded before the wait
            print(f"decode d{hd} g{group} bs{bs} split={split} pdl={split}: {resource_usage(k)}; "
                  f"griddepcontrol x{ptx.count('griddepcontrol')}, "
                  f"loads before the wait x{len(re.findall(r'ld[.]global', before))}")
        for block_m, warps in ((64, 4), (128, 8)):
            k = compile_kernel(tk._prefill_kernel, dict(
                common, num_reqs=3, GROUP_PAD=C(group), BLOCK_Q=C(block_m // group), BLOCK_N=C(64)),
                num_warps=warps)
            print(f"prefill d{hd} g{group} bs{bs} M{block_m} w{warps}: {resource_usage(k)}")
    k = compile_kernel(tk._decode_reduce_kernel, dict(
        part_out_ptr=torch.float32, part_lse_ptr=torch.float32, query_start_ptr=torch.int32,
        out_ptr=dt, num_splits=3, stride_ot=4096, stride_oh=128, NUM_Q_HEADS=C(32), HEAD_DIM=C(128),
        DIM_PAD=C(128), SPLITS_PAD=C(32), PDL=C(True)))
    print(f"reduce pdl: {resource_usage(k)}; griddepcontrol x{k.asm['ptx'].count('griddepcontrol')}")
    k = compile_kernel(cs._store_kv_kernel, dict(
        key_ptr=dt, value_ptr=dt, cache_ptr=dt, slot_ptr=torch.int64, stride_kt=1024, stride_kh=128,
        stride_vt=1024, stride_vh=128, stride_cache_kv=1 << 33, stride_cache_slot=1024,
        stride_cache_head=128, NUM_KV_HEADS=C(8), HEAD_DIM=C(128), HEADS_PAD=C(8), DIM_PAD=C(128)))
    print(f"store: {resource_usage(k)}")
    for name, (fn, args) in ko.aot_examples(dt).items():
        k = compile_kernel(fn, args)
        print(f"{name}: {resource_usage(k)}; griddepcontrol x{k.asm['ptx'].count('griddepcontrol')}")
    from engine.kernels import greedy
    k = compile_kernel(greedy._argmax_table_kernel, dict(
        values_ptr=torch.float32, indices_ptr=torch.int32, table_ptr=torch.float32, vocab_start=64128,
        tp_rank=1, tp_size=2, NUM_CHUNKS=C(64), TABLE_PAD=C(4)))
    print(f"argmax_table: {resource_usage(k)}")
    k = compile_kernel(greedy._table_pick_kernel, dict(
        table_ptr=torch.float32, out_ptr=torch.int64, tp_size=2, TP_PAD=C(2)))
    print(f"table_pick: {resource_usage(k)}")
    from engine.kernels import gemv as gk
    for bn, bk, warps, pdl, self_slot in ((2, 2048, 4, True, False), (4, 1024, 4, False, False),
                                          (8, 1024, 8, True, False), (16, 256, 4, True, False),
                                          (2, 2048, 4, True, True), (8, 1024, 8, True, True)):
        k = compile_kernel(gk._gemv_row_push_kernel.fn, dict(
            x_ptr=dt, w_ptr=dt, out_ptr=dt, N=4096, K=7168, stride_wn=7168, table_ptr=torch.int64,
            rank=1, world=2, slot_words=65536, BLOCK_N=C(bn), BLOCK_K=C(bk), EVEN_K=C(True),
            EVEN_N=C(True), PRE_K=C(bk), PDL=C(pdl), SELF=C(self_slot)), num_warps=warps, num_stages=3)
        # the packets must leave as whole 8-byte (or wider) stores: the LL reader's atomicity;
        # no-wait (SELF): nothing but the packets (no b16 store of the output)
        stores = sorted(set(re.findall(r"st\.global[.\w]*", k.asm["ptx"])))
        gdc = k.asm["ptx"].count("griddepcontrol")
        print(f"gemv_row_push N{bn} K{bk} w{warps} pdl={pdl} self={self_slot}: {resource_usage(k)}; "
              f"stores {stores}; griddepcontrol x{gdc}")


if __name__ == "__main__":
    main()

"""Compile the CUDA C sources of the IPC all-reduces for sm_90 on a machine without a GPU.

Catches compile errors before any device time is spent (CuPy compiles them with NVRTC at
start-up on the device, and a failure there turns the path off)::

    pip install nvidia-cuda-nvrtc-cu12   # or KVMESH_NVRTC=/path/to/libnvrtc.so.12
    python -m tests.gpu.nvrtc_compile

Prints, per kernel and dtype, the PTX size, its fences and atomics, and (through the ptxas
bundled with Triton) registers and spills per thread.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import subprocess
import tempfile


def _libnvrtc() -> ctypes.CDLL:
    path = os.environ.get("KVMESH_NVRTC")
    if not path:
        import nvidia.cuda_nvrtc  # the pip wheel's package
        found = sorted(glob.glob(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib", "libnvrtc.so*")))
        if not found:
            raise FileNotFoundError("libnvrtc.so not found in nvidia.cuda_nvrtc; set KVMESH_NVRTC")
        path = found[0]
    return ctypes.CDLL(path)


def compile_ptx(lib: ctypes.CDLL, source: str, options: list[str]) -> str:
    """PTX of ``source``; raises with NVRTC's log if it does not compile."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            raise RuntimeError(f"NVRTC error {rc}:\n{log.value.decode()}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def ptxas_usage(ptx: str) -> str:
    """ptxas -v's register and spill line for sm_90 (Triton's bundled ptxas); '' without it."""
    try:
        import triton
    except ImportError:
        return ""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    for _ in range(2):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            res = subprocess.run([ptxas, "-arch=sm_90", "-v", f.name, "-o", os.devnull],
                                 capture_output=True, text=True)
        # NVRTC may be newer than Triton's ptxas: retry at the PTX version ptxas names
        newest = re.search(r"current version is '(\d+\.\d+)'", res.stderr)
        if res.returncode == 0 or newest is None:
            break
        ptx = re.sub(r"^\.version \d+\.\d+", f".version {newest.group(1)}", ptx, flags=re.M)
    lines = [line.split("ptxas info    : ")[-1] for line in res.stderr.splitlines()
             if "registers" in line or "spill" in line]
    return "; ".join(lines) if res.returncode == 0 else res.stderr.strip()[-300:]


def main() -> None:
    from engine.distributed import custom_allreduce, ll_allreduce
    lib = _libnvrtc()
    runs = [(module, ()) for module in (ll_allreduce, custom_allreduce)]
    runs.insert(1, (ll_allreduce, ("-DLL_TRIGGER_AFTER_WAIT=1",)))  # KVMESH_LL_TRIGGER=wait
    runs.insert(2, (ll_allreduce, ("-DLL_STAMPS=1",)))  # KVMESH_LL_STAMPS=1
    runs.insert(3, (ll_allreduce, ("-DLL_STORE_RELAXED=1",)))  # KVMESH_LL_RELAXED_STORES=1
    # the builds a call picks (BUILDS: threads x lines per thread), and the ones A/B runs try
    for threads, lpt in sorted(set(ll_allreduce.BUILDS) | {(256, 4), (128, 8)}):
        runs.insert(3, (ll_allreduce, (f"-DTHREADS={threads}", f"-DLPT={lpt}")))
    for module, extra in runs:
        for code, dtype in enumerate(("bf16", "fp16", "fp32")):
            ptx = compile_ptx(lib, module.kernel_source(),
                              ["--gpu-architecture=compute_90", f"-DKV_DTYPE={code}", *extra])
            # the order of the two griddepcontrol instructions (w: wait, l: launch_dependents)
            order = "".join(m[0] for m in re.findall(r"griddepcontrol\.(wait|launch_dependents)", ptx))
            print(f"{module.__name__.rsplit('.', 1)[-1]}{''.join(' ' + e for e in extra)} {dtype}: "
                  f"{ptx.count(chr(10))} PTX lines, {ptx.count('membar') + ptx.count('fence.')} fences, "
                  f"{ptx.count('atom.')} atomics, griddepcontrol {order or '-'} | {ptxas_usage(ptx)}")


if __name__ == "__main__":
    main()

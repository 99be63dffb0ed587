"""The CUDA kernels' resource report for sm_90 (nvcc -Xptxas -v), read on a machine without a
GPU: a register array indexed at run time, or a tile that outgrows the register budget, shows
here as a stack frame and spills before anyone times the kernel on an H100.

Measured with nvcc 13.0 (2026-12-05): bm_image 48 registers, no stack; bm_tiled 96 registers
(the cap of __launch_bounds__(288, 2)) and bm_direct 64, with 16-24 byte stack frames and
24-32 bytes of spill stores (bm_tiled 24-32 and 36-40 since its re-score became a loop that scores
every candidate of a block whose a holds an inf or NaN, 2026-12-06). Those are the registers saved around the calls to the slow paths of
IEEE float division and 64-bit integer division (CALL.REL in the SASS, no LDL/STL inside the
FFMA loops); a spill in the main loop would cost far more than the bound below."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")


def _report() -> dict[str, dict[str, int]]:
    src = os.path.join(ROOT, "csrc", "block_match", "block_match_kernel.cu")
    cmd = [NVCC, "-O3", "-std=c++17", "-DWITH_CUDA", "-I", os.path.join(ROOT, "csrc", "include"),
           "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v", "-c", src, "-o", os.devnull]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, name = {}, None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            k = re.search(r"(bm_\w+?_kernel)I(\w+?)E", m.group(1))
            name = f"{k.group(1)}<{re.sub(r'^[0-9]+', '', k.group(2))}>" if k else m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            out.setdefault(name, {}).update(stack=int(m.group(1)), stores=int(m.group(2)), loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out.setdefault(name, {})["regs"] = int(m.group(1))
    return out


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_block_match_kernels_fit_their_registers():
    rep = _report()
    kinds = {n.split("<")[0] for n in rep}
    assert kinds == {"bm_image_kernel", "bm_tiled_kernel", "bm_direct_kernel"}, rep
    assert len(rep) == 9, rep  # float, half, bfloat16 of each
    for name, r in rep.items():
        assert r["stack"] <= 32 and r["stores"] <= 48 and r["loads"] <= 128, (name, r)
        if name.startswith("bm_image"):
            assert r["stores"] == 0 and r["stack"] == 0, (name, r)
        if name.startswith("bm_tiled"):
            assert r["regs"] <= 112, (name, r)  # two CTAs of 288 threads per SM

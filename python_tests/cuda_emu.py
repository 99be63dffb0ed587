"""Build and run a CUDA launcher of csrc/ on the CPU under cuda_emu (python_tests/cuda_emu/).

The ``.cu`` file is compiled by g++ after three textual rewrites that C++ cannot express with
macros (``extern __shared__`` arrays, ``__shared__`` variables, each a per-block allocation, and
the ``<<<...>>>`` launch syntax, which also passes the kernel's name); everything else comes from
``cuda_emu/cuda_emu.h`` and the stand-in CUDA headers in ``cuda_emu/include``. Sanitizers:
``"address"`` (AddressSanitizer + UndefinedBehaviorSanitizer: out-of-bounds global and shared
memory, misaligned vector loads, integer overflow) or ``"thread"`` (ThreadSanitizer, with one OS
thread per CUDA thread: shared-memory races between barriers).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EMU = os.path.join(HERE, "cuda_emu")

SANITIZE = {
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread", "-DCUEMU_THREADS"],
}

_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\[\];")
_SHARED_VAR = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)\s*(\[[^\]]+\])?\s*;")
_LAUNCH = re.compile(r"([\w:]+(?:<[\w:, ]*>)?)<<<(.+?)>>>\((.*?)\);")
_BOUNDS = re.compile(r"__launch_bounds__\(\s*([^,)]+)[^)]*\)\s*(\w+)\s*\(")


def emulated_source(cu_text: str, expect: dict) -> str:
    """``cu_text`` rewritten for g++ and cuda_emu; ``expect`` = {"extern": n, "shared": n,
    "launches": n}, the numbers of each construct, guards the rewrites against kernel edits that
    they would silently miss."""
    text, n_ext = _EXTERN_SHARED.subn(r"\1* \2 = reinterpret_cast<\1*>(::cuemu::dynamic_smem());", cu_text)
    sites = iter(range(1 << 30))

    def shared(m):  # one allocation per block and declaration, NaN until written (cuda_emu.h)
        ty, name, dims = m.group(1), m.group(2), m.group(3) or ""
        ref = f"(&{name}){dims}" if dims else f"&{name}"
        return f"{ty} {ref} = ::cuemu::static_shared<{ty}{dims}>({next(sites)});"

    text, n_shared = _SHARED_VAR.subn(shared, text)
    # __launch_bounds__(max threads, ...) of each kernel: checked at its launches (a block larger
    # than the bound fails to launch on a GPU)
    bounds = {name: bound for bound, name in _BOUNDS.findall(text)}

    def launch(m):
        kernel, config, args = m.groups()
        bound = bounds.get(kernel.split("<")[0], "1024")
        return f'::cuemu::launch({kernel}, "{kernel}", {bound}, {config}, {args});'

    text, n_launch = _LAUNCH.subn(launch, text)
    got = {"extern": n_ext, "shared": n_shared, "launches": n_launch}
    if got != expect:
        raise AssertionError(f"rewrote {got}, expected {expect}: update cuda_emu.py")
    return text


def sanitizer_available(sanitizer: str) -> bool:
    """Whether g++ here links a program with ``sanitizer``'s runtime (libasan/libubsan, libtsan)."""
    if shutil.which("g++") is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = ["g++", *SANITIZE[sanitizer], src, "-o", os.path.join(tmp, "probe")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def _compile(sources: list, binary: str, sanitizer: str | None, extra: tuple = ()) -> str:
    """g++ ``sources`` against the emulator's headers into ``binary`` (with ``sanitizer``'s
    flags, or none); returns ``binary``."""
    if shutil.which("g++") is None:
        raise RuntimeError("g++ not found")
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-pthread", "-Wno-unknown-pragmas",
           *(SANITIZE[sanitizer] if sanitizer else []), "-I", os.path.join(EMU, "include"), *extra,
           *sources, "-o", binary]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return binary


def build_selftest(sanitizer: str | None, out_dir: str) -> str:
    """Compile ``cuda_emu/selftest_main.cpp`` (the emulator's own tests) with ``sanitizer``
    ("thread" for the OS-thread model) or none; returns the binary."""
    return _compile([os.path.join(EMU, "selftest_main.cpp")],
                    os.path.join(out_dir, f"selftest_{sanitizer or 'plain'}"), sanitizer)


def build(op: str, sanitizer: str, out_dir: str, expect: dict,
          mutation: tuple[str, str] | None = None, name: str = "") -> str:
    """Compile ``csrc/<op>/<op>_kernel.cu`` with ``cuda_emu/<op>_main.cpp``; returns the binary.

    ``mutation = (old, new)`` replaces the one occurrence of ``old`` in the kernel first: the
    tests plant known bugs this way to show that the emulator catches them.
    """
    with open(os.path.join(ROOT, "csrc", op, f"{op}_kernel.cu")) as f:
        text = f.read()
    if mutation is not None:
        if text.count(mutation[0]) != 1:
            raise AssertionError(f"mutation target found {text.count(mutation[0])} times: {mutation[0]!r}")
        text = text.replace(*mutation)
    src = emulated_source(text, expect)
    kernel_cpp = os.path.join(out_dir, f"{op}_kernel_emu{name}.cpp")
    with open(kernel_cpp, "w") as f:
        f.write(f'#line 1 "csrc/{op}/{op}_kernel.cu"\n' + src)
    return _compile([os.path.join(EMU, f"{op}_main.cpp"), kernel_cpp],
                    os.path.join(out_dir, f"{op}_{sanitizer}{name}"), sanitizer,
                    ("-DWITH_CUDA", "-I", os.path.join(ROOT, "csrc", op)))


def _span(t: torch.Tensor) -> torch.Tensor:
    """The elements of t's storage from its first to its last one, as a flat contiguous copy
    (the layout travels as strides)."""
    n = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.as_strided((n,), (1,)).contiguous()


def _bytes(t: torch.Tensor) -> bytes:
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def block_match(binary: str, a, b, block_size, search_radius, data_range=1.0, centers=None, flip=None,
                path: str = "auto", max_grid: int | None = None, smem_optin: int | None = None,
                order: str = "forward", launches: list | None = None, timeout: float = 600) -> tuple:
    """Run the emulated CUDA launcher of block_match: kernel forced by ``path`` (as
    EFFSSL_BLOCK_MATCH_CUDA_PATH does), at most ``max_grid`` CTAs, a device with ``smem_optin``
    bytes of opt-in shared memory (default an H100's), fibers run in ``order`` (forward, reverse
    or random:SEED). Returns ``(psnr, offset)`` like ``ek.block_match``; raises AssertionError on
    a non-zero launcher status, a sanitizer report or a crash. ``launches``, when given, receives
    the names of the kernels launched (``bm_tiled_kernel<T>``, ...)."""
    N, C, H, W = a.shape
    Hb, Wb = H // block_size, W // block_size
    sa, sb = _span(a), _span(b)
    header = [N, C, H, W, block_size, search_radius, KINDS[a.dtype], centers is not None, flip is not None,
              sa.numel(), sb.numel(), *a.stride(), *b.stride(), 0]
    blob = torch.tensor(header, dtype=torch.int64).numpy().tobytes()
    blob += torch.tensor([data_range], dtype=torch.float64).numpy().tobytes() + _bytes(sa) + _bytes(sb)
    if centers is not None:
        blob += _bytes(centers.to(torch.int32).contiguous())
    if flip is not None:
        blob += _bytes(flip.to(torch.uint8).contiguous())
    env = dict(os.environ)
    env.pop("EFFSSL_BLOCK_MATCH_CUDA_PATH", None)
    if path != "auto":
        env["EFFSSL_BLOCK_MATCH_CUDA_PATH"] = path
    if max_grid is not None:
        env["CUEMU_MAX_GRID"] = str(max_grid)
    if smem_optin is not None:
        env["CUEMU_SMEM_OPTIN"] = str(smem_optin)
    env["CUEMU_ORDER"] = order
    env["TSAN_OPTIONS"] = "halt_on_error=1 exitcode=66"
    env["ASAN_OPTIONS"] = "detect_leaks=0"
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.bin"), os.path.join(tmp, "out.bin")
        with open(src, "wb") as f:
            f.write(blob)
        proc = subprocess.run([binary, src, dst], capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0 or "runtime error" in proc.stderr or "WARNING: ThreadSanitizer" in proc.stderr:
            raise AssertionError(f"emulated kernel failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        with open(dst, "rb") as f:
            out = f.read()
    launched = re.findall(r"^cuemu: launch (\S+)", proc.stderr, re.M)
    if launches is not None:
        launches.extend(launched)
    status = int.from_bytes(out[:8], "little", signed=True)
    if status != 0:
        raise AssertionError(f"launcher returned cudaError {status}:\n{proc.stderr[-2000:]}")
    # block_match_cuda_last_path() (what the benchmark reports) names the kernel that ran
    last = re.findall(r"^cuemu: last path (\S*)", proc.stderr, re.M)
    want = re.match(r"bm_(\w+)_kernel", launched[-1]).group(1) if launched else ""
    assert last == [want], f"block_match_cuda_last_path() said {last}, the launcher ran {launched}"
    blocks = N * Hb * Wb
    psnr = torch.frombuffer(bytearray(out[8 : 8 + 4 * blocks]), dtype=torch.float32).reshape(N, Hb, Wb)
    off = torch.frombuffer(bytearray(out[8 + 4 * blocks :]), dtype=torch.int32).reshape(N, Hb, Wb, 2)
    return psnr, off

"""Build of effssl_kernels._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Environment switches:
  EFFSSL_SKIP_CUDA=1      build the CPU kernels only (quick local builds)
  EFFSSL_FORCE_CUDA=1     fail instead of silently skipping CUDA when it cannot be built
  TORCH_CUDA_ARCH_LIST    GPU archs (default "8.0;9.0+PTX"; CI uses "9.0")
  MAX_JOBS                parallel compile jobs (torch's ninja builder)
  CUDA_HOME               toolkit root; found from nvcc on PATH when unset (see _find_cuda_home)
  EFFSSL_SANITIZE=address,undefined
                          build the C++ files with those sanitizers (run Python with the ASan
                          runtime preloaded: README.md, "Sanitizers")
"""
import glob
import sys
import os
import re
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """Toolkit root: the folder whose include/ holds cuda_runtime.h.

    The nvcc on PATH can be a wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`); torch
    would then take the wrapper's parent for the toolkit and the link fails on -lcudart
    (research/toolchain.md). Follow symlinks and such wrappers to the real nvcc.
    """
    nvcc = shutil.which("nvcc")
    for _ in range(4):
        if nvcc is None:
            return None
        nvcc = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(nvcc))
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
        except OSError:
            return None
        m = re.search(r"exec\s+\"?(/[^\s\"]+/nvcc)\b", head)
        nvcc = m.group(1) if m else None
    return None


for _var in ("CUDA_HOME", "CUDA_PATH"):
    if os.environ.get(_var) == "":  # set but empty is unset (torch would take /usr/local)
        del os.environ[_var]
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    found = _find_cuda_home()
    if found:
        os.environ["CUDA_HOME"] = found
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

# torch.utils.cpp_extension reads CUDA_HOME at import: import it only now.
import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    if _flag("EFFSSL_SKIP_CUDA"):
        return False
    ok = torch.version.cuda is not None and CUDA_HOME is not None
    if _flag("EFFSSL_FORCE_CUDA") and not ok:
        raise RuntimeError(
            f"EFFSSL_FORCE_CUDA=1 but CUDA cannot be built: torch.version.cuda={torch.version.cuda}, "
            f"CUDA_HOME={CUDA_HOME}. Install a CUDA build of torch and the CUDA toolkit (nvcc)."
        )
    return ok


def _check_object_names(sources):
    """x_cuda.cpp and x_cuda.cu would both compile to x_cuda.o (ninja: 'multiple rules')."""
    stems = {}
    for src in sources:
        stem = os.path.splitext(src)[0]
        if stem in stems:
            raise RuntimeError(f"{stems[stem]} and {src} build the same object file; rename one (csrc/README.md)")
        stems[stem] = src


def _extension():
    with_cuda = _want_cuda()
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3"]
    link = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for's `#pragma omp parallel` lives in a header: without -fopenmp on our
        # own files every CPU kernel silently runs on one thread, whatever set_num_threads says.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sanitize = os.environ.get("EFFSSL_SANITIZE", "")  # e.g. address,undefined: the CPU kernels only
    if sanitize:
        cxx += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g"]
        link.append(f"-fsanitize={sanitize}")
    macros = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/*/*_cuda.cpp")) + sorted(glob.glob("csrc/*/*.cu"))
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        macros += [("WITH_CUDA", None), ("EFFSSL_CUDA_ARCHS", f'"{archs}"')]
        nvcc = ["-O3", "-lineinfo", "-std=c++17", "-DWITH_CUDA"]
        _check_object_names(sources)
        return CUDAExtension(
            "effssl_kernels._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
        )
    return CppExtension(
        "effssl_kernels._C", sources, include_dirs=include_dirs, define_macros=macros,
        extra_compile_args={"cxx": cxx}, extra_link_args=link,
    )


setup(
    name="effssl_kernels",
    version="0.1.0",
    packages=find_packages(include=["effssl_kernels", "effssl_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    license="Apache-2.0",
)

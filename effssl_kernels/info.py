"""``python -m effssl_kernels.info``: what was built and what will run."""
from __future__ import annotations

import os
import platform


def info() -> dict:
    import torch

    from . import __version__, _backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    d = {
        "effssl_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "triton": triton_version,
        "compiled extension (_C)": _backend.HAS_EXT,
        "CUDA kernels built": _backend.HAS_CUDA_KERNELS,
        "built for archs": _backend._C.cuda_archs() if _backend.HAS_EXT else None,
        "GPU": gpu,
        "EFFSSL_BACKEND": os.environ.get("EFFSSL_BACKEND", "auto"),
        "EFFSSL_TILE_CONV": os.environ.get("EFFSSL_TILE_CONV", "cudnn"),
        "TRITON_INTERPRET": _backend.TRITON_INTERPRET,
    }
    if not _backend.HAS_EXT:
        d["extension import error"] = _backend._EXT_ERROR
    for dev in ("cpu", "cuda"):
        try:
            d[f"block_match on {dev}"] = _backend.choose(dev)
        except (RuntimeError, ValueError) as e:  # ValueError: a bad EFFSSL_BACKEND, shown, not raised
            d[f"block_match on {dev}"] = f"unavailable ({e})"
    return d


def main() -> None:
    for k, v in info().items():
        print(f"{k:28s} {v}")


if __name__ == "__main__":
    main()

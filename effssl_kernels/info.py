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
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (no CUDA device visible)"
    d = {
        "effssl_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "triton": triton_version,
        "compiled extension (_C)": _backend.HAS_EXT,
        "CUDA kernels built": _backend.HAS_CUDA_KERNELS,
        "built for archs": (_backend._C.cuda_archs() or "none (CPU-only build)") if _backend.HAS_EXT else None,
        "GPU": gpu,
        "EFFSSL_BACKEND": os.environ.get("EFFSSL_BACKEND", "auto"),
        "EFFSSL_CHECK_INDICES": os.environ.get("EFFSSL_CHECK_INDICES", "0"),
        "TRITON_INTERPRET": _backend.TRITON_INTERPRET,
    }
    if not _backend.HAS_EXT:
        d["extension import error"] = _backend._EXT_ERROR
    # Which kernel runs: block_match has CUDA kernels; the other ops (gather_tokens,
    # patch_embed_gather, halo_gather, multi_crop, photometric) run Triton on CUDA tensors.
    for dev in ("cpu", "cuda"):
        for op, cuda_kernel in (("block_match", True), ("other kernels", False)):
            try:
                d[f"{op} on {dev}"] = _backend.choose(dev, cuda_kernel)
            except (RuntimeError, ValueError) as e:  # ValueError: a bad EFFSSL_BACKEND, shown, not raised
                d[f"{op} on {dev}"] = f"unavailable ({e})"
    from .sparse.conv import tile_conv_choice

    try:
        d["stride-1 tile convs"] = {"cudnn": "halo_gather + cuDNN/oneDNN (EFFSSL_TILE_CONV=cudnn)",
                                    "implicit": "Triton implicit GEMM on CUDA (EFFSSL_TILE_CONV=implicit)"
                                    }[tile_conv_choice()]
    except ValueError as e:
        d["stride-1 tile convs"] = f"invalid ({e})"
    return d


def main() -> None:
    for k, v in info().items():
        print(f"{k:24s} {v}")


if __name__ == "__main__":
    main()

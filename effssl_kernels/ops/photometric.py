"""photometric: parameter packing, dispatch and op registrations (forward only).

Two ops, each with a fake impl so ``torch.compile(fullgraph=True)`` traces them: the C++ op
``effssl_kernels::photometric`` (CPU kernel, schema in csrc/bindings.cpp) and the Triton op
``effssl_kernels::_photometric_triton`` (CUDA tensors; CPU only under TRITON_INTERPRET=1). Both
take the parameters packed by :func:`pack_params` (one float32 row per sample, the blur kernels
and the normalisation), so a kernel reads a sample's whole recipe from one row.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._utils import to_device_async
from ..reference.photometric import gaussian_kernel1d

# Columns of the packed parameter rows (csrc/bindings.cpp states the same layout).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
ORDER = 4  # 4 columns: op ids 0..3 (brightness, contrast, saturation, hue) in the order they run
JITTER, GRAY, BLUR, SOLARIZE, THRESHOLD = 8, 9, 10, 11, 12
NUM_COLS = 13

# An extension built before this op existed has no schema for it: import anyway (the reference and
# Triton paths work) and let the C++ path fail with the rebuild hint.
HAS_CPP_OP = _backend.HAS_EXT and hasattr(torch.ops.effssl_kernels, "photometric")


def pack_params(params, N: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """:class:`PhotometricParams` for ``N`` views -> ``(packed [N, 13], blur_weights [N, K],
    norm [2, 3] or None)``, float32, on the parameters' device, without a host sync.

    A sample blurs where ``blur_sigma > 0``; its weights row is torchvision's kernel for that
    sigma (rows of unblurred samples hold the sigma-1 kernel and are never read).
    """
    f = torch.float32
    dev = params.brightness.device
    thr = params.solarize_threshold
    thr = thr.to(f) if isinstance(thr, Tensor) else torch.full((N,), float(thr), dtype=f, device=dev)
    blur = params.blurs()
    cols = [params.brightness.to(f), params.contrast.to(f), params.saturation.to(f), params.hue.to(f),
            *params.order.to(f).unbind(1), params.jitter_apply.to(f), params.gray.to(f), blur.to(f),
            params.solarize.to(f), thr]
    packed = torch.stack(cols, 1) if N else torch.zeros((0, NUM_COLS), dtype=f, device=dev)
    sigma = torch.where(blur, params.blur_sigma.to(f), torch.ones((), dtype=f, device=dev))
    weights = gaussian_kernel1d(params.blur_kernel, sigma)
    norm = None
    if params.mean is not None:
        norm = torch.stack([params.mean.to(f), params.std.to(f)])
    return packed.contiguous(), weights.contiguous(), norm


def out_dtype(views_dtype: torch.dtype, has_norm: bool) -> torch.dtype:
    """uint8 views with normalisation give float32; everything else keeps the views' dtype."""
    return torch.float32 if (views_dtype == torch.uint8 and has_norm) else views_dtype


def channels_last_out(views: Tensor) -> bool:
    """The output is channels_last iff the views are (and are not also contiguous)."""
    return views.is_contiguous(memory_format=torch.channels_last) and not views.is_contiguous()


def empty_out(views: Tensor, has_norm: bool) -> Tensor:
    fmt = torch.channels_last if channels_last_out(views) else torch.contiguous_format
    return torch.empty(views.shape, dtype=out_dtype(views.dtype, has_norm), device=views.device,
                       memory_format=fmt)


def run(views: Tensor, params, N: int) -> Tensor:
    """Dispatch the checked ``views`` / ``params`` to the C++, Triton or reference implementation.
    CPU parameters for device views are packed on the CPU and copied in three non-blocking
    transfers."""
    which = _backend.choose(views.device.type, cuda_kernel=False)
    if which == "reference":
        from ..reference.photometric import photometric_reference

        return photometric_reference(views, params.to(views.device))
    packed, weights, norm = (to_device_async(t, views.device) for t in pack_params(params, N))
    if which == "triton":
        return torch.ops.effssl_kernels._photometric_triton(views, packed, weights, norm)
    if not HAS_CPP_OP:
        raise RuntimeError(f"photometric: the compiled extension has no photometric kernel. {_backend.REBUILD_HINT}")
    return torch.ops.effssl_kernels.photometric.default(views, packed, weights, norm)


# ----------------------------------------------------------------------------- checks, fake impls
def _check_op(views, params, blur_weights, norm) -> None:
    """The op's shapes and dtypes (what the C++ kernel checks, but the values): run by the fake and
    the Triton op, so a direct op call fails as the C++ one would."""
    op = "photometric"
    if not isinstance(views, Tensor) or views.dim() != 4 or views.shape[1] != 3:
        raise ValueError(f"{op}: views must be [N, 3, H, W]")
    if views.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
        raise TypeError(f"{op}: views must be float32, float16, bfloat16 or uint8, got {views.dtype}")
    N = views.shape[0]
    tables = {"params": params, "blur_weights": blur_weights, **({} if norm is None else {"norm": norm})}
    for name, t in tables.items():
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be a float32 tensor")
        if t.device != views.device:
            raise ValueError(f"{op}: {name} must be on {views.device}, got {t.device}")
    for name, t, shape in (("params", params, (N, NUM_COLS)), ("norm", norm, (2, 3))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must be {list(shape)}, got {list(t.shape)}")
    if blur_weights.dim() != 2 or blur_weights.shape[0] != N or blur_weights.shape[1] % 2 != 1:
        raise ValueError(f"{op}: blur_weights must be [N, K] with N = {N} and K odd, got {list(blur_weights.shape)}")


def _fake(views, params, blur_weights, norm):
    _check_op(views, params, blur_weights, norm)
    return empty_out(views, norm is not None)


if HAS_CPP_OP:
    torch.library.register_fake("effssl_kernels::photometric")(_fake)


@torch.library.triton_op("effssl_kernels::_photometric_triton", mutates_args=())
def _photometric_triton(views: Tensor, params: Tensor, blur_weights: Tensor, norm: Optional[Tensor]) -> Tensor:
    from ..triton.photometric import photometric_fwd  # lazy: importing triton costs ~2.5 s

    _check_op(views, params, blur_weights, norm)
    return photometric_fwd(views, params, blur_weights, norm)


_backend.register_interpreter_fakes((_photometric_triton, _fake))

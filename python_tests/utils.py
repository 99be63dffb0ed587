"""Shared test helpers: devices, tolerances, layouts."""
import inspect
import os

import pytest
import torch

from effssl_kernels.reference.photometric import photometric_mismatch

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# torch.export traced with Dynamo (strict=True) by default before torch 2.8: there a model that
# reads a mask entered outside the export is refused by torch itself ("Cannot export model which
# references tensors that are neither buffers/parameters/constants nor are direct inputs")
EXPORT_STRICT_BY_DEFAULT = inspect.signature(torch.export.export).parameters["strict"].default
TORCH_REFUSES_FREE_TENSORS = "references tensors that are neither buffers"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Tolerances of psnr in dB against the reference's psnr of the same candidate. The kernels read
# the same rounded inputs and accumulate in float32, so only summation order differs.
PSNR_ATOL_DB = {torch.float32: 1e-3, torch.float16: 1e-3, torch.bfloat16: 1e-3}

requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
# tests of what happens on a machine without one (e.g. --device cuda there): no GPU run needed
without_gpu = pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a CUDA device")


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as ``x`` in another memory layout: contiguous, channels_last or a strided slice."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        N, C, H, W = x.shape
        big = torch.zeros(N, C + 1, H + 3, 2 * W + 1, dtype=x.dtype, device=x.device)
        big[:, 1:, 2 : H + 2, 1 : 2 * W : 2] = x
        y = big[:, 1:, 2 : H + 2, 1 : 2 * W : 2]
        assert not y.is_contiguous()
        return y
    raise ValueError(layout)


def candidate_mse(a, b, block_size, offset, centers=None, flip=None):
    """Direct float32 mse of the candidate ``centers + offset`` of each block, [N, Hb, Wb].

    +inf where that candidate is not inside ``b`` (so callers can check validity).
    """
    N, C, H, W = a.shape
    B = block_size
    Hb, Wb = H // B, W // B
    dev = a.device
    a32, b32 = a.float(), b.float()
    if flip is not None:
        b32 = torch.where(flip.view(N, 1, 1, 1), b32.flip(-1), b32)
    if centers is None:
        cy = (torch.arange(Hb, device=dev) * B).view(1, Hb, 1).expand(N, Hb, Wb)
        cx = (torch.arange(Wb, device=dev) * B).view(1, 1, Wb).expand(N, Hb, Wb)
    else:
        cy, cx = centers[..., 0].long(), centers[..., 1].long()
    y0 = cy + offset[..., 0].long()
    x0 = cx + offset[..., 1].long()
    valid = (y0 >= 0) & (y0 <= H - B) & (x0 >= 0) & (x0 <= W - B)
    ar = torch.arange(B, device=dev)
    rows = y0.clamp(0, H - B)[..., None] + ar
    cols = x0.clamp(0, W - B)[..., None] + ar
    idx = (rows[..., :, None] * W + cols[..., None, :]).reshape(N, 1, -1).expand(N, C, -1)
    cand = b32.reshape(N, C, H * W).gather(2, idx).reshape(N, C, Hb, Wb, B, B)
    a_blk = a32[:, :, : Hb * B, : Wb * B].reshape(N, C, Hb, B, Wb, B).permute(0, 1, 2, 4, 3, 5)
    mse = (a_blk - cand).square().mean(dim=(1, 4, 5))
    return torch.where(valid, mse, torch.full_like(mse, float("inf")))


def assert_block_match(psnr, offset, a, b, block_size, search_radius, data_range=1.0,
                       centers=None, flip=None, exact_offsets=False):
    """Check a kernel's (psnr, offset) against the reference under SEMANTICS.md's tie rule.

    The returned candidate must lie in the window, its direct mse must be within 1e-4 relative
    (+ 1e-7 * data_range^2) of the reference's least mse, and psnr must be that candidate's psnr
    within 1e-3 dB. Blocks without a candidate: -inf and (0, 0). NaN blocks: NaN in both.
    """
    from effssl_kernels.reference import block_match_reference

    N, C, H, W = a.shape
    Hb, Wb = H // block_size, W // block_size
    assert psnr.shape == (N, Hb, Wb) and psnr.dtype == torch.float32
    assert offset.shape == (N, Hb, Wb, 2) and offset.dtype == torch.int32
    psnr, offset = psnr.cpu(), offset.cpu()
    a, b = a.cpu(), b.cpu()
    centers = None if centers is None else centers.cpu()
    flip = None if flip is None else flip.cpu()
    ref_psnr, ref_off = block_match_reference(a, b, block_size, search_radius, data_range, centers, flip)
    if exact_offsets:
        assert torch.equal(offset, ref_off), (offset - ref_off).abs().max()

    none = torch.isneginf(ref_psnr)
    assert torch.equal(torch.isneginf(psnr), none), "blocks without a candidate differ"
    assert (offset[none] == 0).all()
    nan = torch.isnan(ref_psnr)
    assert torch.equal(torch.isnan(psnr), nan), "NaN blocks differ"

    live = ~none & ~nan
    assert (offset.abs() <= search_radius).all()
    mse = candidate_mse(a, b, block_size, offset, centers, flip)
    ref_mse = candidate_mse(a, b, block_size, ref_off, centers, flip)
    assert torch.isfinite(mse[live]).all(), "returned candidate outside b"
    slack = 1e-4 * ref_mse + 1e-7 * data_range**2
    assert (mse[live] <= ref_mse[live] + slack[live]).all(), (mse - ref_mse)[live].max()
    own = 10 * torch.log10(torch.full_like(mse, data_range**2) / mse)  # not scalar / mse: see the reference
    both_inf = torch.isposinf(own) & torch.isposinf(psnr)
    diff = torch.where(both_inf, torch.zeros_like(own), (psnr - own).abs())
    assert (diff[live] <= 1e-3).all(), f"psnr off its candidate's mse by {diff[live].max()} dB"


def random_mask(N, H, W, B, p=0.5, seed=0, device="cpu"):
    """A BlockMask of ``N`` images ``H x W`` with blocks ``B`` kept with probability ``p``."""
    from effssl_kernels.masks import BlockMask

    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, H // B, W // B, generator=g) < p
    return BlockMask(keep.to(device), B, (H, W))


# ------------------------------------------------------------------------------- photometric
PHOTOMETRIC_OPS = ("brightness", "contrast", "saturation", "hue", "gray", "blur", "solarize")


def photometric_case(n, h, w, dtype, ops=PHOTOMETRIC_OPS, p=1.0, k=5, norm=True, seed=0):
    """(views [n, 3, h, w], PhotometricParams) with the ``ops`` switched on per sample with
    probability ``p`` (random factors, order, sigma, thresholds) and every other op the identity.
    The views have flat, saturated and gray regions (the clamps and the hsv special cases)."""
    from effssl_kernels.photometric import IMAGENET_MEAN, IMAGENET_STD, PhotometricParams

    g = torch.Generator().manual_seed(seed)
    on = {op: (torch.rand(n, generator=g) < p) & (op in ops) for op in PHOTOMETRIC_OPS}

    def factor(op, lo, hi):
        v = torch.rand(n, generator=g) * (hi - lo) + lo
        return torch.where(on[op], v, torch.full_like(v, 0.0 if op == "hue" else 1.0))

    jitter = on["brightness"] | on["contrast"] | on["saturation"] | on["hue"]
    params = PhotometricParams(
        brightness=factor("brightness", 0.2, 1.8), contrast=factor("contrast", 0.2, 1.8),
        saturation=factor("saturation", 0.0, 2.0), hue=factor("hue", -0.5, 0.5),
        jitter_apply=jitter, order=torch.rand(n, 4, generator=g).argsort(dim=1), gray=on["gray"],
        blur_sigma=torch.where(on["blur"], torch.rand(n, generator=g) * 1.9 + 0.1, torch.zeros(n)),
        blur_kernel=k, solarize=on["solarize"],
        solarize_threshold=torch.rand(n, generator=g) * 0.8 + 0.1,
        mean=torch.tensor(IMAGENET_MEAN) if norm else None, std=torch.tensor(IMAGENET_STD) if norm else None,
    )
    x = torch.rand(n, 3, h, w, generator=g)
    x[0, :, : max(1, h // 4)] = 1.0
    x[-1, :, :, : max(1, w // 5)] = 0.25
    if n > 1:
        x[1, :, -2:] = x[1, :1, -2:]  # gray pixels: max == min
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    return x, params


def assert_photometric_close(got, want, views_dtype, level_frac=0.005, std=None):
    """The kernels' tolerance against the reference (``photometric_mismatch`` states it)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    why = photometric_mismatch(got, want, views_dtype, level_frac, std)[2]
    assert not why, why


# ------------------------------------------------------------------------------- Triton tiles
def gpu_tile_choices(monkeypatch, module, names):
    """Make the launchers of Triton ``module`` pick their GPU tile sizes under the interpreter:
    each function in ``names`` runs with ``module._INTERPRET`` False. Returns the list of what
    they returned, call by call (so a test can check which tiles ran)."""
    seen = []

    def on_gpu(fn):
        def call(*a):
            with monkeypatch.context() as m:
                m.setattr(module, "_INTERPRET", False)
                seen.append(fn(*a))
            return seen[-1]
        return call

    for name in names:
        monkeypatch.setattr(module, name, on_gpu(getattr(module, name)))
    return seen


def solarize_tie_case(dtype, n=2, h=3, w=4):
    """(views, params, tie): every sample solarized at a threshold that some pixels equal exactly
    (0.25 for float views, 128/255 for uint8 ones; not 0.5, which inverts to itself), beside
    pixels one step below and above it.
    torchvision inverts ``x >= threshold``, so ``tie`` (bool, the views' shape) marks pixels that
    must be inverted although random thresholds would never hit them."""
    from effssl_kernels.photometric import PhotometricParams

    if dtype == torch.uint8:
        thr, levels = 128 / 255, torch.tensor([127, 128, 129], dtype=torch.uint8)
    else:
        at = torch.tensor(0.25, dtype=dtype)
        below = torch.nextafter(at, torch.tensor(0.0, dtype=dtype))
        above = torch.nextafter(at, torch.tensor(1.0, dtype=dtype))
        thr, levels = 0.25, torch.stack([below, at, above])
    views = levels[torch.arange(n * 3 * h * w) % 3].view(n, 3, h, w)
    z = torch.zeros(n, dtype=torch.bool)
    params = PhotometricParams(
        brightness=torch.ones(n), contrast=torch.ones(n), saturation=torch.ones(n), hue=torch.zeros(n),
        jitter_apply=z.clone(), order=torch.arange(4).repeat(n, 1), gray=z.clone(),
        blur_sigma=torch.zeros(n), blur_kernel=3, solarize=~z, solarize_threshold=torch.full((n,), thr))
    return views, params, views == levels[1]

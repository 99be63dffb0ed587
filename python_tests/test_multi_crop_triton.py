"""multi_crop on the Triton path (EFFSSL_BACKEND=triton) against the reference.

On a GPU machine the kernel runs on CUDA tensors; elsewhere on CPU tensors under
TRITON_INTERPRET=1 (conftest.py), so shapes stay tiny. The kernel does the reference's float32
operations in its order, so under the interpreter outputs are exact, except that it truncates
float32 -> bfloat16 on stores (one bfloat16 step). On a GPU the compiler contracts multiply-adds
into FMAs: float rounding, and one level for uint8 outputs on a .5 boundary (_tol).
"""
import pytest
import torch

pytest.importorskip("triton")

from effssl_kernels.ops.multi_crop import multi_crop  # noqa: E402
from effssl_kernels.reference.multi_crop import multi_crop_reference  # noqa: E402
from utils import HAS_GPU, INTERPRET, make_layout  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (HAS_GPU or INTERPRET), reason="needs a CUDA device or TRITON_INTERPRET=1"),
]

DEVICE = "cuda" if HAS_GPU else "cpu"


def _tol(dtype, scale=1.0):
    """(rtol, atol) of the Triton kernel against the reference for outputs of ``dtype`` whose
    values reach ``scale``."""
    if INTERPRET:
        return (2**-7, 0.0) if dtype == torch.bfloat16 else (0.0, 0.0)
    # FMA contraction: a few float32 ulps of the value, then the output's own rounding may flip
    step = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}
    if dtype == torch.uint8:
        return 0.0, 1.0
    return step[dtype], 4 * 2**-23 * scale


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("EFFSSL_BACKEND", "triton")


def _case(dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 13, 11, generator=gen)
    x = (x * 255).to(dtype) if dtype == torch.uint8 else x.to(dtype)
    boxes = torch.cat([torch.rand(2, 3, 2, generator=gen) * 16 - 3, torch.rand(2, 3, 2, generator=gen) * 14 + 0.5], -1)
    boxes[0, 0] = torch.tensor([0.0, 0.0, 13.0, 11.0])  # an integer box: the plain resize
    flips = torch.rand(2, 3, generator=gen) < 0.5
    return make_layout(x, layout), boxes, flips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_matches_reference(dtype, layout):
    x, boxes, flips = _case(dtype, layout)
    got = multi_crop(x.to(DEVICE), boxes.to(DEVICE), flips.to(DEVICE), (7, 9))
    want = multi_crop_reference(x.contiguous(), boxes, flips, (7, 9))
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol)


def test_uint8_to_float32_and_outside():
    x, boxes, flips = _case(torch.uint8, "contiguous", seed=1)
    boxes[1, 2] = torch.tensor([40.0, 40.0, 3.0, 3.0])  # wholly outside: zeros
    got = multi_crop(x.to(DEVICE), boxes.to(DEVICE), flips.to(DEVICE), 5, out_dtype=torch.float32).cpu()
    rtol, atol = _tol(torch.float32, scale=255.0)
    torch.testing.assert_close(got, multi_crop_reference(x, boxes, flips, (5, 5), torch.float32), rtol=rtol, atol=atol)
    assert torch.equal(got[5], torch.zeros_like(got[5]))


def test_float64_falls_back_to_reference():
    x, boxes, flips = _case(torch.float64, "contiguous")
    got = multi_crop(x.to(DEVICE), boxes.to(DEVICE), flips.to(DEVICE), 4).cpu()
    torch.testing.assert_close(got, multi_crop_reference(x, boxes, flips, (4, 4)), rtol=0, atol=0)


def test_bad_box_raises(monkeypatch):
    # The host check (a device-side assert on CUDA would poison this process's CUDA context).
    monkeypatch.setenv("EFFSSL_CHECK_INDICES", "1")
    x, boxes, flips = _case(torch.float32, "contiguous")
    boxes[1, 1, 2] = 0.0
    with pytest.raises(ValueError, match="positive"):
        multi_crop(x.to(DEVICE), boxes.to(DEVICE), flips.to(DEVICE), 4)


def test_sub_pixel_boxes():
    # boxes under one pixel a side: the taps clamp to max(size - 1, 0) (audit 93)
    x = torch.rand(1, 2, 6, 7, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[1.25, 2.5, 0.5, 0.75], [2.0, 1.0, 3.0, 0.25]]])
    flips = torch.zeros(1, 2, dtype=torch.bool)
    got = multi_crop(x.to(DEVICE), boxes.to(DEVICE), flips.to(DEVICE), (3, 4)).cpu()
    rtol, atol = _tol(torch.float32)
    torch.testing.assert_close(got, multi_crop_reference(x, boxes, flips, (3, 4)), rtol=rtol, atol=atol)


def test_strided_flips():
    # flips whose reshape is a view with stride 2: read as if contiguous they mirror the wrong
    # crops, without an error (made on the device: a copy there would be contiguous)
    x = torch.rand(2, 3, 8, 9, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[0.0, 0.0, 8.0, 9.0]]).repeat(2, 3, 1)
    flips = torch.tensor([[True, False] * 3, [False, True] * 3], device=DEVICE)[:, ::2]
    assert flips.reshape(6).stride() == (2,)
    got = multi_crop(x.to(DEVICE), boxes.to(DEVICE), flips, (4, 5)).cpu()
    rtol, atol = _tol(torch.float32)
    want = multi_crop_reference(x, boxes, flips.cpu().contiguous(), (4, 5))
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)

"""multi_crop (SEMANTICS.md section 4): the C++ CPU kernel and the reference against torchvision,
and the kernel against the reference on odd shapes, layouts, dtypes and boxes.

Tolerances: against torchvision (integer boxes) float32 within 1e-5 (the same arithmetic, only
contraction and summation order may differ), uint8 within 1 (torch's uint8 resize uses
fixed-point weights). The C++ kernel and the reference do the same float32 (float64) operations
in the same order, so they agree exactly.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effssl_kernels as ek
from effssl_kernels.reference import multi_crop_reference
from utils import INTERPRET, make_layout

TF = pytest.importorskip("torchvision.transforms.v2.functional")


def _boxes(N, P, H, W, gen, inside=False):
    """Random int boxes [N, P, 4]; unless ``inside``, some reach past the image."""
    if inside:
        h = torch.randint(1, H + 1, (N, P), generator=gen)
        w = torch.randint(1, W + 1, (N, P), generator=gen)
        t = (torch.rand(N, P, generator=gen) * (H - h + 1)).long()
        l = (torch.rand(N, P, generator=gen) * (W - w + 1)).long()  # noqa: E741
    else:
        h = torch.randint(1, H + 6, (N, P), generator=gen)
        w = torch.randint(1, W + 6, (N, P), generator=gen)
        t = torch.randint(-4, H, (N, P), generator=gen)
        l = torch.randint(-4, W, (N, P), generator=gen)  # noqa: E741
    return torch.stack([t, l, h, w], -1)


def _torchvision(images, boxes, flips, size):
    out = []
    for n in range(images.shape[0]):
        for p in range(boxes.shape[1]):
            t, l, h, w = (int(v) for v in boxes[n, p])  # noqa: E741
            v = TF.resized_crop(images[n], t, l, h, w, list(size), antialias=False)
            out.append(TF.horizontal_flip(v) if flips[n, p] else v)
    return torch.stack(out)


@pytest.mark.parametrize("size", [(16, 16), (40, 24), (3, 5)])
@pytest.mark.parametrize("inside", [True, False])
def test_matches_torchvision_float(size, inside):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 29, 41, generator=gen)
    boxes = _boxes(3, 4, 29, 41, gen, inside)
    flips = torch.rand(3, 4, generator=gen) < 0.5
    want = _torchvision(images, boxes, flips, size)
    got = ek.multi_crop(images, boxes, flips, size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(multi_crop_reference(images, boxes, flips, size), want, rtol=1e-5, atol=1e-5)


def test_matches_torchvision_uint8():
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 33, 30), generator=gen, dtype=torch.uint8)
    boxes = _boxes(2, 5, 33, 30, gen, inside=True)
    flips = torch.rand(2, 5, generator=gen) < 0.5
    want = _torchvision(images, boxes, flips, (24, 20))
    got = ek.multi_crop(images, boxes, flips, (24, 20))
    assert got.dtype == torch.uint8
    assert (got.int() - want.int()).abs().max() <= 1


def test_flip_mirrors():
    images = torch.rand(1, 2, 12, 12)
    boxes = torch.tensor([[[1, 2, 9, 7], [1, 2, 9, 7]]])
    out = ek.multi_crop(images, boxes, torch.tensor([[False, True]]), (6, 5))
    torch.testing.assert_close(out[1], out[0].flip(-1), rtol=0, atol=0)
    assert not torch.equal(out[0], out[1])  # the patch is not symmetric, so the test can fail


def test_identity_box_is_a_copy():
    images = torch.rand(2, 3, 10, 14)
    boxes = torch.tensor([0, 0, 10, 14]).expand(2, 1, 4)
    out = ek.multi_crop(images, boxes, None, (10, 14))
    torch.testing.assert_close(out, images, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_matches_reference(dtype, layout):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 23, 19, generator=gen)
    x = (x * 255).to(dtype) if dtype == torch.uint8 else x.to(dtype)
    x = make_layout(x, layout)
    boxes = _boxes(2, 3, 23, 19, gen).float() + torch.rand(2, 3, 4, generator=gen) * 0.9  # fractional
    flips = torch.rand(2, 3, generator=gen) < 0.5
    got = ek.multi_crop(x, boxes, flips, (11, 17))
    want = multi_crop_reference(x.contiguous(), boxes, flips, (11, 17))
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_output_contiguous_on_every_backend(backend, monkeypatch):
    # the docstring's "contiguous" held for the kernel only: the reference (the fallback, and
    # what EFFSSL_BACKEND=reference runs) returned channels-last strides that .view refused
    monkeypatch.setenv("EFFSSL_BACKEND", backend)
    images = (torch.rand(2, 3, 40, 50) * 255).to(torch.uint8)
    boxes = torch.tensor([[[2.0, 3.0, 20.0, 30.0]], [[5.0, 5.0, 10.0, 10.0]]])
    out = ek.multi_crop(images, boxes, None, (8, 12))
    assert out.shape == (2, 3, 8, 12) and out.is_contiguous()
    torch.testing.assert_close(out, multi_crop_reference(images, boxes, torch.zeros(2, 1, dtype=torch.bool),
                                                         (8, 12)), rtol=0, atol=0)


@pytest.mark.parametrize("box_dtype", [torch.int32, torch.int64, torch.float64, torch.float16])
def test_box_dtypes(box_dtype):
    images = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[[1, 2, 9, 10]], [[0, 3, 12, 8]]])
    flips = torch.tensor([[True], [False]])
    want = ek.multi_crop(images, boxes.float(), flips, 8)
    torch.testing.assert_close(ek.multi_crop(images, boxes.to(box_dtype), flips, 8), want, rtol=0, atol=0)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_uint8_to_float(out_dtype):
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    boxes = torch.tensor([[[1.5, 2.0, 9.0, 10.25]], [[0, 3, 12, 8]]])
    got = ek.multi_crop(images, boxes, None, (7, 9), out_dtype=out_dtype)
    assert got.dtype == out_dtype
    want = multi_crop_reference(images.float(), boxes, torch.zeros(2, 1, dtype=torch.bool), (7, 9))
    torch.testing.assert_close(got.float(), want.to(out_dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="the Triton kernel runs on CPU tensors only under TRITON_INTERPRET=1"))])
def test_zero_weight_taps_are_not_read(monkeypatch, backend):
    # Upscaling a box whose last row is the image's row 3: the taps of row 4 have weight 0 and
    # must not be read, so NaN below the box stays out (torchvision's crop never sees it either).
    monkeypatch.setenv("EFFSSL_BACKEND", backend)
    images = torch.rand(1, 1, 8, 8)
    images[:, :, 4:] = float("nan")
    images[:, :, :, 4:] = float("nan")
    out = ek.multi_crop(images, torch.tensor([[[0, 0, 4, 4]]]), None, 9)
    assert torch.isfinite(out).all()
    assert torch.isfinite(multi_crop_reference(images, torch.tensor([[[0, 0, 4, 4]]]),
                                               torch.zeros(1, 1, dtype=torch.bool), (9, 9))).all()


def test_nan_inside_the_box_propagates():
    images = torch.rand(1, 1, 8, 8)
    images[0, 0, 2, 2] = float("nan")
    out = ek.multi_crop(images, torch.tensor([[[0, 0, 8, 8]]]), None, 8)
    assert torch.isnan(out[0, 0, 2, 2]) and torch.isfinite(out[0, 0, 6, 6])


def test_outside_the_image_is_zero():
    images = torch.ones(1, 2, 6, 6)
    out = ek.multi_crop(images, torch.tensor([[[20, 20, 4, 4], [-10, -10, 4, 4]]]), None, 3)
    assert torch.equal(out, torch.zeros_like(out))


def test_empty():
    images = torch.rand(2, 3, 8, 8)
    assert ek.multi_crop(images, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), 4).shape == (0, 3, 4, 4)
    assert ek.multi_crop(torch.rand(0, 3, 8, 8), torch.zeros(0, 5, 4), None, 4).shape == (0, 3, 4, 4)


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(1, 3), P=st.integers(1, 4), C=st.integers(1, 4),
    H=st.integers(1, 20), W=st.integers(1, 20), oh=st.integers(1, 24), ow=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_fuzz(N, P, C, H, W, oh, ow, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen)
    boxes = torch.cat(
        [torch.rand(N, P, 2, generator=gen) * torch.tensor([H + 4.0, W + 4.0]) - 3,
         torch.rand(N, P, 2, generator=gen) * torch.tensor([H + 4.0, W + 4.0]) + 0.1], -1)
    flips = torch.rand(N, P, generator=gen) < 0.5
    got = ek.multi_crop(x, boxes, flips, (oh, ow))
    torch.testing.assert_close(got, multi_crop_reference(x, boxes, flips, (oh, ow)), rtol=0, atol=0)


def test_errors():
    x = torch.rand(2, 3, 8, 8)
    boxes = torch.tensor([[[0, 0, 4, 4]], [[1, 1, 5, 5]]])
    flips = torch.zeros(2, 1, dtype=torch.bool)
    with pytest.raises(TypeError, match="images must be"):
        ek.multi_crop(x.int(), boxes, flips, 4)
    with pytest.raises(ValueError, match=r"images must be \[N, C, H, W\]"):
        ek.multi_crop(x[0], boxes, flips, 4)
    # past 2^24 pixels the kernels' float32 source index is no longer exact (a wide image read
    # neighbouring columns), and past 2^30 their clamp would land inside the image
    for side in (2**24 + 1, 2**30 + 1):
        tall = torch.zeros(2, 1, 1, 1).expand(2, 1, side, 1)  # no memory: stride 0
        with pytest.raises(ValueError, match="H and W must be at most"):
            ek.multi_crop(tall, boxes, flips, 4)
        with pytest.raises(ValueError, match="H and W must be at most"):
            ek.multi_crop(tall.transpose(2, 3), boxes, flips, 4)
        # the C++ op too (a direct call read the neighbouring column before 2026-12-06)
        with pytest.raises(ValueError, match="H and W must be at most"):
            torch.ops.effssl_kernels.multi_crop(tall.transpose(2, 3), boxes, flips, 4, 4, None)
        # and the output side: its float32 coordinates (the Triton kernel's OH * OW also wrapped
        # int32 past 46340 a side, returning torch.empty's memory)
        with pytest.raises(ValueError, match="out_size must be at most"):
            ek.multi_crop(x, boxes, flips, (4, side))
        with pytest.raises(ValueError, match="out_size must be at most"):
            torch.ops.effssl_kernels.multi_crop(x, boxes, flips, side, 4, None)
    with pytest.raises(ValueError, match=r"boxes must be \[N, P, 4\]"):
        ek.multi_crop(x, boxes[:, :, :3], flips, 4)
    with pytest.raises(ValueError, match=r"boxes must be \[N, P, 4\]"):
        ek.multi_crop(x, boxes[:1], flips, 4)
    with pytest.raises(TypeError, match="flips must be a bool"):
        ek.multi_crop(x, boxes, flips.int(), 4)
    with pytest.raises(ValueError, match="flips must be"):
        ek.multi_crop(x, boxes, flips[:, :0], 4)
    with pytest.raises(ValueError, match="out_size must be positive"):
        ek.multi_crop(x, boxes, flips, (0, 4))
    with pytest.raises(TypeError, match="out_dtype"):
        ek.multi_crop(x, boxes, flips, 4, out_dtype=torch.uint8)
    with pytest.raises(TypeError, match="out_dtype must be the images' dtype"):  # the ops: float64 to float64
        torch.ops.effssl_kernels.multi_crop(x.double(), boxes, flips, 4, 4, torch.float32)
    # the wrapper crops float64 images in float64, then casts (documented; a TypeError naming
    # its own allowed dtypes until 2026-12-06)
    want = ek.multi_crop(x.double(), boxes, flips, 4)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        got = ek.multi_crop(x.double(), boxes, flips, 4, out_dtype=dt)
        assert got.dtype == dt and torch.equal(got, want.to(dt))
    for bad in ([0, 0, 0, 4], [0, 0, 4, -1], [float("nan"), 0, 4, 4], [0, float("inf"), 4, 4]):
        b = boxes.float().clone()
        b[1, 0] = torch.tensor(bad)
        with pytest.raises(ValueError, match="finite with positive height and width"):
            ek.multi_crop(x, b, flips, 4)
    for bad in ([0, 0, 1e-50, 4], [0, 0, 1e39, 4]):  # fine in float64, 0 and inf in float32
        b = boxes.double().clone()
        b[1, 0] = torch.tensor(bad, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"1e[-+]?[35]\d.*in float32"):
            ek.multi_crop(x, b, flips, 4)
    with pytest.raises(RuntimeError, match="forward only"):
        ek.multi_crop(x.requires_grad_(), boxes, flips, 4)


def test_direct_op_checks_boxes():
    # The C++ op checks what the wrapper checks, so a direct torch.ops call fails as clearly.
    with pytest.raises(ValueError, match="finite with positive"):
        torch.ops.effssl_kernels.multi_crop(torch.rand(1, 1, 4, 4), torch.tensor([[[0.0, 0, 0, 2]]]),
                                            torch.zeros(1, 1, dtype=torch.bool), 2, 2, None)


def test_opcheck():
    x = torch.rand(2, 3, 9, 7)
    boxes = torch.tensor([[[0.5, 1, 6, 5], [2, 0, 7, 7]], [[1, 1, 3, 3], [0, 0, 9, 7]]])
    flips = torch.tensor([[True, False], [False, True]])
    torch.library.opcheck(torch.ops.effssl_kernels.multi_crop.default, (x, boxes, flips, 5, 4, None))
    torch.library.opcheck(torch.ops.effssl_kernels.multi_crop.default,
                          ((x * 255).to(torch.uint8), boxes, flips, 5, 4, torch.bfloat16))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    torch._dynamo.reset()
    x = torch.rand(2, 3, 12, 10)
    boxes = torch.tensor([[[0, 1, 8, 7], [2, 2, 9, 8]], [[1, 0, 6, 6], [0, 0, 12, 10]]])
    flips = torch.tensor([[True, False], [False, True]])

    def f(x, boxes, flips):
        return ek.multi_crop(x, boxes, flips, (6, 5)) * 2 + 1

    got = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)(x, boxes, flips)
    torch.testing.assert_close(got, f(x, boxes, flips), rtol=0, atol=0)


@pytest.mark.parametrize("box", [[0, 0, 0, 5], [0, 0, 5, -1], [0, float("nan"), 5, 5], [0, 0, 1e39, 5]])
def test_compile_fullgraph_checks_boxes(box):
    # Compiled, the host check cannot run; a bad box is asserted in the graph instead of giving
    # zeros or plausible values (until 2026-12-06 it was not checked there).
    torch._dynamo.reset()
    x = torch.rand(2, 3, 12, 10)
    boxes = torch.tensor([[[0, 1, 8, 7]], [box]], dtype=torch.float64)
    fn = torch.compile(lambda x, b: ek.multi_crop(x, b, None, 4), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="finite with positive height and width"):
        fn(x, boxes)

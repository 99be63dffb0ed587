"""photometric's C++ kernel (CPU tensors, the default backend) against the reference, the op
registration, bad input, and the MultiViewAugment pipeline. The reference itself is checked
against torchvision in test_photometric.py; the Triton kernel in test_photometric_triton.py.
Tolerances: utils.assert_photometric_close."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effssl_kernels as ek
from effssl_kernels.ops.photometric import HAS_CPP_OP, pack_params
from effssl_kernels.photometric import PhotometricSampler
from effssl_kernels.reference.photometric import photometric_reference
from test_photometric import _tv_chain
from utils import PHOTOMETRIC_OPS, assert_photometric_close, make_layout, photometric_case

pytestmark = pytest.mark.skipif(not HAS_CPP_OP, reason="extension built without the photometric kernel")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]


@pytest.fixture(autouse=True)
def _cpp_backend(monkeypatch):
    monkeypatch.setenv("EFFSSL_BACKEND", "auto")


def _check(x, params, dtype, **kw):
    got = ek.photometric(x, params)
    want = photometric_reference(x.contiguous(), params)
    assert_photometric_close(got, want, dtype, **kw)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", PHOTOMETRIC_OPS)
@pytest.mark.parametrize("norm", [False, True])
def test_each_op_alone(dtype, op, norm):
    x, params = photometric_case(5, 11, 13, dtype, ops=(op,), norm=norm, seed=len(op))
    got = _check(x, params, dtype)
    if not norm and op != "hue":
        assert not torch.equal(got, x)  # the op did something


# ops without a reduction (contrast's mean and blur's taps sum in another order) compute what the
# reference computes in the same order, so the kernel is bit-exact there: this pins the details
# a tolerance absorbs (a hue of exactly 0 skipped, as ColorJitter does; uint8 scaled by * (1/255)
# as to_dtype(scale=True), not / 255)
BIT_EXACT_OPS = [(), ("brightness",), ("saturation",), ("hue",), ("gray",), ("solarize",),
                 ("brightness", "saturation", "hue", "gray", "solarize")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=str)
@pytest.mark.parametrize("ops", BIT_EXACT_OPS, ids=lambda o: "+".join(o) or "none")
@pytest.mark.parametrize("norm", [False, True])
def test_bit_exact_without_reductions(dtype, ops, norm):
    x, params = photometric_case(6, 13, 11, dtype, ops=ops, p=0.7, norm=norm, seed=3)
    assert torch.equal(ek.photometric(x, params), photometric_reference(x, params))


def half_level_blur_case(n=1, h=4, w=6):
    """(views, packed params, blur weights, norm, want): uint8 columns 0, 1, 0, 1, ... blurred by
    [1/4, 1/2, 1/4] in both directions (reflect padding), every other op off, so every blurred
    value is exactly 0.5 or an integer: ``want`` rounds half to even (0.5 -> 0), as the reference
    (torch.round) does. Random sigmas never land on a half level."""
    from effssl_kernels.ops.photometric import BLUR, GRAY, JITTER, SOLARIZE

    _, params = photometric_case(n, h, w, torch.uint8, ops=("blur",), k=3, norm=False)
    packed, _, norm = pack_params(params, n)
    packed[:, BLUR], packed[:, GRAY], packed[:, JITTER], packed[:, SOLARIZE] = 1.0, 0.0, 0.0, 0.0
    weights = torch.tensor([[0.25, 0.5, 0.25]]).expand(n, 3).contiguous()
    views = torch.zeros(n, 3, h, w, dtype=torch.uint8)
    views[..., 1::2] = 1
    padded = torch.nn.functional.pad(views.float().reshape(-1, 1, h, w), (1, 1, 1, 1), mode="reflect")
    blurred = torch.nn.functional.conv2d(padded, (weights[:1].T @ weights[:1]).reshape(1, 1, 3, 3))
    assert (blurred == 0.5).any()
    return views, packed, weights, norm, blurred.round().reshape(n, 3, h, w).to(torch.uint8)


def test_uint8_blur_rounds_half_to_even():
    views, packed, weights, norm, want = half_level_blur_case()
    assert torch.equal(torch.ops.effssl_kernels.photometric(views, packed, weights, norm), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["simclr", "byol1", "byol2", "dino_local"])
def test_presets(dtype, preset):
    g = torch.Generator().manual_seed(3)
    sampler = {
        "simclr": lambda: PhotometricSampler.simclr(blur_kernel=7, generator=g),
        "byol1": lambda: PhotometricSampler.byol(1, blur_kernel=9, generator=g),
        "byol2": lambda: PhotometricSampler.byol(2, blur_kernel=9, solarize_p=0.5, generator=g),
        "dino_local": lambda: PhotometricSampler.dino_local(blur_kernel=5, generator=g),
    }[preset]()
    x, _ = photometric_case(16, 19, 23, dtype, seed=4)
    _check(x, sampler.sample(16), dtype)


def test_matches_torchvision_chain():
    """The fused kernel against the chain of torchvision v2 functional calls, per sample."""
    x, params = photometric_case(6, 12, 14, torch.float32, k=5, p=0.7, norm=False, seed=11)
    got = ek.photometric(x, params)
    for i in range(6):
        want = _tv_chain(x[i], params, i)
        torch.testing.assert_close(got[i], want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_layouts(layout, dtype):
    x, params = photometric_case(4, 9, 10, dtype, k=3, seed=6)
    got = _check(make_layout(x, layout), params, dtype)
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    torch.testing.assert_close(got.contiguous(), ek.photometric(x, params), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 2, 1), (3, 1, 17), (2, 40, 3)])
def test_odd_shapes_without_blur(shape):
    n, h, w = shape
    x, params = photometric_case(n, h, w, torch.float32, ops=PHOTOMETRIC_OPS[:5] + ("solarize",), seed=h * w)
    _check(x, params, torch.float32)


def test_nan_pixels_stay_nan():
    x, params = photometric_case(3, 6, 7, torch.float32, ops=("brightness", "saturation", "gray", "solarize"), seed=1)
    x[0, :, 2, 3] = float("nan")
    x[1, 1, 0, 0] = float("nan")
    got = _check(x, params, torch.float32)  # equal NaN masks are part of the check
    assert bool(got[0, :, 2, 3].isnan().all())


def test_empty_batch():
    x, params = photometric_case(1, 5, 5, torch.uint8)
    params = type(params)(*[v[:0] if isinstance(v, torch.Tensor) and v.shape[:1] == (1,) else v for v in params])
    out = ek.photometric(x[:0], params)
    assert out.shape == (0, 3, 5, 5) and out.dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4), h=st.integers(2, 12), w=st.integers(2, 12), k=st.sampled_from([1, 3]),
    dtype=st.sampled_from(DTYPES), p=st.floats(0.0, 1.0), norm=st.booleans(), seed=st.integers(0, 10**6),
)
def test_fuzz_shapes_and_flags(n, h, w, k, dtype, p, norm, seed):
    x, params = photometric_case(n, h, w, dtype, p=p, k=k, norm=norm, seed=seed)
    # tiny images have few elements: allow one level-off element among them
    _check(x, params, dtype, level_frac=max(0.005, 1.01 / x.numel()))


def test_reproducible_from_seed():
    x, _ = photometric_case(8, 16, 16, torch.uint8)
    draw = lambda: PhotometricSampler.simclr(blur_kernel=5, generator=torch.Generator().manual_seed(7)).sample(8)  # noqa: E731
    a, b = ek.photometric(x, draw()), ek.photometric(x, draw())
    assert torch.equal(a, b)
    c = ek.photometric(x, PhotometricSampler.simclr(blur_kernel=5, generator=torch.Generator().manual_seed(8)).sample(8))
    assert not torch.equal(a, c)


def test_opcheck():
    x, params = photometric_case(3, 7, 8, torch.uint8, k=3, seed=2)
    packed, weights, norm = pack_params(params, 3)
    torch.library.opcheck(torch.ops.effssl_kernels.photometric.default, (x, packed, weights, norm))
    torch.library.opcheck(torch.ops.effssl_kernels.photometric.default, (x.float() / 255, packed, weights, None))


def test_compile_fullgraph():
    x, params = photometric_case(3, 7, 8, torch.float32, k=3, seed=2)
    fn = torch.compile(ek.photometric, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, params), ek.photometric(x, params), rtol=0, atol=0)


@pytest.mark.parametrize("field,value", [
    ("hue", lambda p: torch.full_like(p.hue, 0.9)),
    ("brightness", lambda p: torch.full_like(p.brightness, -1.0)),
    ("contrast", lambda p: torch.full_like(p.contrast, float("nan"))),
    ("order", lambda p: torch.zeros_like(p.order)),  # not a permutation: brightness four times
    ("std", lambda p: torch.zeros_like(p.std)),
    ("blur_sigma", lambda p: torch.ones_like(p.blur_sigma)),  # a 3-tap blur on 1-pixel-high views
])
def test_compile_fullgraph_checks_values(field, value):
    # Compiled, the host check cannot run; the values are asserted in the graph instead of
    # being run as some other op (until 2026-12-06 they were not checked at all there).
    x, params = photometric_case(3, 1 if field == "blur_sigma" else 7, 8, torch.float32, k=3, seed=2)
    bad = params._replace(**{field: value(params)})
    with pytest.raises((ValueError, RuntimeError)):
        ek.photometric(x, bad)  # eager: the host check
    torch._dynamo.reset()
    fn = torch.compile(ek.photometric, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="out of range|blur"):
        fn(x, bad)


# ------------------------------------------------------------------------------ bad input
def test_bad_views():
    _, params = photometric_case(2, 5, 5, torch.float32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ek.photometric([1, 2], params)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        ek.photometric(torch.rand(2, 4, 5, 5), params)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        ek.photometric(torch.rand(3, 5, 5), params)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or uint8"):
        ek.photometric(torch.zeros(2, 3, 5, 5, dtype=torch.int32), params)
    with pytest.raises(RuntimeError, match="forward only"):
        ek.photometric(torch.rand(2, 3, 5, 5, requires_grad=True), params)
    with pytest.raises(ValueError, match="for 2 views, the views have N=3"):
        ek.photometric(torch.rand(3, 3, 5, 5), params)  # 3 views, parameters for 2
    with pytest.raises(TypeError, match="PhotometricParams"):
        ek.photometric(torch.rand(2, 3, 5, 5), dict(params._asdict()))


@pytest.mark.parametrize("field,value,match", [
    ("brightness", torch.tensor([1.0, -0.5]), ">= 0"),
    ("hue", torch.tensor([0.0, 0.7]), r"\[-0.5, 0.5\]"),
    ("blur_sigma", torch.tensor([-1.0, 0.0]), ">= 0"),
    ("order", torch.tensor([[0, 1, 2, 3], [0, 0, 2, 3]]), "permutations"),
    ("solarize_threshold", 1.5, r"\[0, 1\]"),
    ("blur_kernel", 4, "odd"),
    ("gray", torch.tensor([1, 0]), "bool"),
    ("contrast", torch.tensor([1.0, float("nan")]), "finite"),
])
def test_bad_params(field, value, match):
    x, params = photometric_case(2, 5, 5, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        ek.photometric(x, params._replace(**{field: value}))


def test_blur_kernel_too_large():
    x, params = photometric_case(2, 5, 6, torch.float32, ops=("blur",), k=11)
    with pytest.raises(ValueError, match="blur_kernel 11 needs views larger than 5 px"):
        ek.photometric(x, params)
    # the same kernel size is fine when no sample blurs
    ek.photometric(x, params._replace(blur_sigma=torch.zeros(2)))


def test_cpp_op_checks_blur_kernel_against_view_size():
    # the op called directly (no Python checks) refuses a kernel whose reflect padding K // 2
    # reaches the view's side (pad == H reads past the plane; audit 96)
    x, params = photometric_case(2, 5, 6, torch.float32, ops=("blur",), k=11)
    packed, weights, norm = pack_params(params, 2)
    assert bool(packed[:, 10].any())  # some sample blurs
    with pytest.raises(ValueError, match="needs views larger than 5 px"):
        torch.ops.effssl_kernels.photometric.default(x, packed, weights, norm)


def test_cpp_op_checks_packed_tensors():
    x, params = photometric_case(2, 5, 5, torch.float32, k=3)
    packed, weights, norm = pack_params(params, 2)
    op = torch.ops.effssl_kernels.photometric.default
    with pytest.raises(ValueError, match="params"):
        op(x, packed[:, :12], weights, norm)
    with pytest.raises(ValueError, match="odd"):
        op(x, packed, weights[:, :2], norm)
    with pytest.raises((ValueError, TypeError), match="norm"):
        op(x, packed, weights, norm[:1])
    bad = packed.clone()
    bad[0, 4] = 7.0
    with pytest.raises(ValueError, match="order"):
        op(x, bad, weights, norm)


# ------------------------------------------------------------------------------ pipeline
def test_multi_view_augment_dino():
    imgs = (torch.rand(3, 3, 40, 48) * 255).to(torch.uint8)
    make = lambda: ek.MultiViewAugment.dino(num_local=4, global_size=24, local_size=12,  # noqa: E731
                                            generator=torch.Generator().manual_seed(0))
    aug = make()
    aug.groups[2] = aug.groups[2]._replace(sampler=PhotometricSampler.dino_local(blur_kernel=5))
    aug.groups[0] = aug.groups[0]._replace(sampler=PhotometricSampler.dino_global(1, blur_kernel=9))
    aug.groups[1] = aug.groups[1]._replace(sampler=PhotometricSampler.dino_global(2, blur_kernel=9))
    out = aug(imgs)
    assert [tuple(v.shape) for v in out.views] == [(3, 3, 24, 24), (3, 3, 24, 24), (12, 3, 12, 12)]
    assert all(v.dtype == torch.float32 for v in out.views) and all(r.dtype == torch.uint8 for r in out.raw)
    for v, r, b, f, p in zip(*out):
        assert torch.equal(r, ek.multi_crop(imgs, b, f, r.shape[-1]))  # raw = the recorded geometry
        assert torch.equal(v, ek.photometric(r, p))  # views = photometric of the raw crops
    assert out.params[0].blur_sigma.gt(0).all()  # DINO's global view 1 always blurs
    # reproducible from the generator
    again = make()
    again.groups = aug.groups
    again.generator = torch.Generator().manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(again(imgs).views, out.views))


def test_multi_view_augment_errors():
    with pytest.raises(ValueError, match="too large"):
        ek.MultiViewAugment.two_view(size=8)  # BYOL's blur kernel 23 on 8 px crops
    with pytest.raises(ValueError, match="uint8"):
        ek.MultiViewAugment.two_view(size=64)(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="at least one"):
        ek.MultiViewAugment([])
    # crop parameters fail at construction, not at the first call
    for kw, msg in [(dict(hflip_p=1.5), "hflip_p"), (dict(hflip_p=float("nan")), "hflip_p"),
                    (dict(ratio=(2.0, 0.5)), "ratio"), (dict(scale=(0.5, 0.1)), "scale")]:
        with pytest.raises(ValueError, match=msg):
            ek.MultiViewAugment.two_view(size=64, **kw)
    with pytest.raises(ValueError, match="num and size must be positive"):  # no view of a group
        ek.MultiViewAugment([ek.CropGroup(0, 16, (0.5, 1.0), PhotometricSampler.dino_local(blur_kernel=5))])


def test_multi_view_augment_dino_without_locals_and_hflip_p():
    imgs = (torch.rand(4, 3, 40, 48) * 255).to(torch.uint8)
    aug = ek.MultiViewAugment.dino(num_local=0, global_size=24, generator=torch.Generator().manual_seed(0))
    assert len(aug.groups) == 2  # the two global crops only
    for p, want in ((0.0, False), (1.0, True)):  # the pipeline's hflip_p reaches every group's boxes
        out = ek.MultiViewAugment.two_view(24, samplers=(PhotometricSampler.dino_local(blur_kernel=5),) * 2,
                                           hflip_p=p, generator=torch.Generator().manual_seed(1))(imgs)
        assert all(bool((f == want).all()) for f in out.flips)


def test_raw_crops_go_to_simwnw_masks():
    # the pipeline's raw uint8 crops and recorded geometry feed the block search directly
    # (compared in float32 with data_range 255: the same psnr as the crops scaled to [0, 1])
    imgs = torch.nn.functional.interpolate(torch.rand(3, 3, 10, 12), size=(40, 48), mode="bilinear")
    imgs = (imgs * 255).round().to(torch.uint8)
    sampler = PhotometricSampler.byol(1, blur_kernel=5)
    out = ek.MultiViewAugment.two_view(32, scale=(0.3, 1.0), samplers=(sampler, sampler),
                                       generator=torch.Generator().manual_seed(0))(imgs)
    geo = dict(boxes_a=out.boxes[0][:, 0], boxes_b=out.boxes[1][:, 0], flips_a=out.flips[0][:, 0],
               flips_b=out.flips[1][:, 0])
    m = ek.simwnw_masks(out.raw[0], out.raw[1], 8, threshold_db=25.0, **geo)
    want = ek.simwnw_masks(out.raw[0].float() / 255, out.raw[1].float() / 255, 8, threshold_db=25.0, **geo)
    torch.testing.assert_close(m.psnr_a, want.psnr_a, rtol=0, atol=1e-3)
    torch.testing.assert_close(m.psnr_b, want.psnr_b, rtol=0, atol=1e-3)
    assert torch.equal(m.keep_a, want.keep_a) and torch.equal(m.keep_b, want.keep_b)
    assert m.psnr_a.isfinite().any()


def test_multi_view_augment_groups_use_their_own_scale():
    imgs = (torch.rand(8, 3, 40, 48) * 255).to(torch.uint8)
    s = PhotometricSampler.dino_local(blur_kernel=5)
    aug = ek.MultiViewAugment([ek.CropGroup(4, 12, (0.1, 0.1), s), ek.CropGroup(2, 12, (1.0, 1.0), s)],
                              ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    small, full = aug(imgs).boxes
    area = small[..., 2] * small[..., 3] / (40 * 48)
    assert (area - 0.1).abs().max() < 0.02  # sqrt(192) = 13.86 -> 14 x 14: 0.102
    assert torch.equal(full, torch.tensor([0.0, 4.0, 40.0, 40.0]).expand(8, 2, 4))  # fallback centre crop

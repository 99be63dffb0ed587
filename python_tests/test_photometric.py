"""Photometric chain (issue 7): the batched reference vs torchvision.transforms.v2.functional,
per sample, and the parameter sampler."""
import pytest
import torch

import effssl_kernels as ek
from effssl_kernels.photometric import IMAGENET_MEAN, IMAGENET_STD, PhotometricParams, PhotometricSampler
from effssl_kernels.reference.photometric import gaussian_kernel1d, photometric_mismatch, photometric_reference

tvF = pytest.importorskip("torchvision.transforms.v2.functional")

from bench import bench_photometric as bp  # noqa: E402  (its torchvision loop is the oracle here too)
from utils import solarize_tie_case  # noqa: E402

N, H, W = 6, 24, 28
K = 9


def _identity(n=N, k=K):
    """Parameters with every flag off."""
    z = torch.zeros(n, dtype=torch.bool)
    return PhotometricParams(
        brightness=torch.ones(n), contrast=torch.ones(n), saturation=torch.ones(n), hue=torch.zeros(n),
        jitter_apply=z.clone(), order=torch.arange(4).repeat(n, 1), gray=z.clone(),
        blur_sigma=torch.zeros(n), blur_kernel=k, solarize=z.clone(), solarize_threshold=0.5,
    )


def _random_values(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        brightness=torch.rand(n, generator=g) * 1.6 + 0.2,
        contrast=torch.rand(n, generator=g) * 1.6 + 0.2,
        saturation=torch.rand(n, generator=g) * 1.6 + 0.2,
        hue=torch.rand(n, generator=g) - 0.5,
        order=torch.rand(n, 4, generator=g).argsort(dim=1),
        blur_sigma=torch.rand(n, generator=g) * 1.9 + 0.1,
        solarize_threshold=torch.rand(n, generator=g) * 0.8 + 0.1,
    )


def _images(dtype, n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, H, W, generator=g)
    x[0, :, :4] = 1.0  # saturated and flat regions: the clamps and the hsv special cases
    x[1, :, :, :3] = 0.25
    if dtype == torch.uint8:
        return (x * 255).round().to(torch.uint8)
    return x.to(dtype)


def _tv_chain(x, p, i, host=None):
    """The chain of torchvision v2 functional calls on sample ``i`` (``x`` [3, H, W]): the bench's
    per-sample loop (``host``: ``per_sample(p)``, computed once by callers looping over samples)."""
    rows, k, norm = host or bp.per_sample(p)
    return bp.torchvision_chain(x, rows[i], k, norm)


def _tv(views, p):
    host = bp.per_sample(p)
    return torch.stack([_tv_chain(views[i], p, i, host) for i in range(views.shape[0])])


def _maxdiff(a, b):
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()


ALL = torch.ones(N, dtype=torch.bool)
SINGLE = {
    # op -> fields that switch it on alone (jitter ops: only that op's factor differs from identity)
    "brightness": lambda v: dict(jitter_apply=ALL, brightness=v["brightness"]),
    "contrast": lambda v: dict(jitter_apply=ALL, contrast=v["contrast"]),
    "saturation": lambda v: dict(jitter_apply=ALL, saturation=v["saturation"]),
    "hue": lambda v: dict(jitter_apply=ALL, hue=v["hue"]),
    "grayscale": lambda v: dict(gray=ALL),
    "blur": lambda v: dict(blur_sigma=v["blur_sigma"]),
    "solarize": lambda v: dict(solarize=ALL, solarize_threshold=v["solarize_threshold"]),
    "normalize": lambda v: dict(mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD)),
}
# float32 tolerance per op: the hue path is torchvision's own rgb<->hsv code, batched, so it
# agrees to float32 rounding (~1e-7); allow 1e-6 for everything, 2e-6 on the hue (the h mod 1
# wrap and the sector floor(6h) may round differently by one ulp of h).
F32_TOL = {"hue": 2e-6}


@pytest.mark.parametrize("op", list(SINGLE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_single_op_matches_torchvision(op, dtype):
    p = _identity()._replace(**SINGLE[op](_random_values()))
    x = _images(dtype)
    out = photometric_reference(x, p)
    ref = _tv(x, p)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if dtype == torch.float32:
        assert _maxdiff(out, ref) <= F32_TOL.get(op, 1e-6), op
    elif op == "normalize":
        assert _maxdiff(out, ref) <= 1e-6
    else:
        # uint8: within 1 (the separable blur rounds a few .5 ties differently); exact otherwise
        assert _maxdiff(out, ref) <= (1 if op == "blur" else 0), op
    # the op did something (so the comparison is not vacuous)
    assert _maxdiff(out, x.float() if dtype == torch.float32 else x) > 0 or op == "normalize"


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("normalize", [False, True])
def test_full_chain_random_order(dtype, normalize):
    v = _random_values(seed=3)
    v["hue"] = v["hue"] * 0.4  # keep the hue shift moderate, as ColorJitter(hue<=0.2) does
    p = _identity()._replace(
        jitter_apply=ALL, gray=torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool),
        solarize=torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool), **v,
    )
    if normalize:
        p = p._replace(mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD))
    assert len({tuple(r) for r in p.order.tolist()}) > 1  # different orders per sample
    x = _images(dtype, seed=4)
    out, ref = photometric_reference(x, p), _tv(x, p)
    assert out.dtype == ref.dtype == (torch.float32 if normalize else dtype)
    if dtype == torch.float32:
        assert _maxdiff(out, ref) <= 1e-5
    else:
        # an off-by-one of the blur's rounding, scaled by 1/255 and 1/std after normalising
        assert _maxdiff(out, ref) <= (1 / 255 / 0.224 + 1e-5 if normalize else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_sampled_chain_matches_torchvision(dtype):
    n = 16
    sampler = PhotometricSampler(jitter_p=0.7, gray_p=0.3, blur_p=0.5, blur_kernel=K, solarize_p=0.5,
                                 generator=torch.Generator().manual_seed(5))
    p = sampler.sample(n)
    x = _images(dtype, n=n, seed=6)
    out, ref = photometric_reference(x, p), _tv(x, p)
    tol = 1e-5 if dtype == torch.float32 else 1 / 255 / 0.224 + 1e-5
    assert _maxdiff(out, ref) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8], ids=str)
def test_solarize_inverts_pixels_at_the_threshold(dtype):
    views, params, tie = solarize_tie_case(dtype)
    want = _tv(views, params)
    got = photometric_reference(views, params)
    assert torch.equal(got, want)
    inv = 255 - views if dtype == torch.uint8 else 1 - views
    assert torch.equal(got[tie], inv[tie]) and not torch.equal(got, views)
    assert torch.equal(ek.photometric(views, params), want)  # the default (C++) kernel too


def test_order_matters():
    # brightness then contrast != contrast then brightness: the per-sample order is honoured
    p = _identity()._replace(jitter_apply=ALL, brightness=torch.full((N,), 1.7), contrast=torch.full((N,), 0.3))
    x = _images(torch.float32)
    a = photometric_reference(x, p._replace(order=torch.tensor([[0, 1, 2, 3]] * N)))
    b = photometric_reference(x, p._replace(order=torch.tensor([[1, 0, 2, 3]] * N)))
    assert _maxdiff(a, b) > 1e-2
    mixed = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]] * (N // 2))
    c = photometric_reference(x, p._replace(order=mixed))
    assert torch.equal(c[0::2], a[0::2]) and torch.equal(c[1::2], b[1::2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_channels_last(dtype):
    sampler = PhotometricSampler(jitter_p=1.0, gray_p=0.5, blur_p=1.0, blur_kernel=K, solarize_p=0.5,
                                 generator=torch.Generator().manual_seed(8))
    p = sampler.sample(N)
    x = _images(dtype, seed=9)
    a = photometric_reference(x, p)
    b = photometric_reference(x.contiguous(memory_format=torch.channels_last), p)
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert _maxdiff(a, b) <= (1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2 ** -9), (torch.bfloat16, 2 ** -6)])
@pytest.mark.parametrize("normalize", [False, True])
def test_half_types(dtype, tol, normalize):
    # computed in float32, rounded once: torchvision's float32 chain on the same (half) input,
    # rounded to the half type, within one ulp (values < 4 -> ulp <= 2**-9 fp16, 2**-6 bf16)
    sampler = PhotometricSampler(jitter_p=1.0, gray_p=0.3, blur_p=0.7, blur_kernel=K, solarize_p=0.5,
                                 generator=torch.Generator().manual_seed(10))
    p = sampler.sample(N)
    if not normalize:
        p = p._replace(mean=None, std=None)
    x = _images(dtype, seed=11)
    out = photometric_reference(x, p)
    assert out.dtype == dtype
    ref = _tv(x.float(), p).to(dtype)
    assert _maxdiff(out, ref) <= tol
    # and close to torchvision computing natively in the half type (rounding after every op)
    native = _tv(x, p)
    assert _maxdiff(out, native) <= 16 * tol


def test_mismatch_rule():
    # the one tolerance rule the tests and the benchmark judge kernels by
    w = torch.rand(2, 3, 8, 8)
    assert photometric_mismatch(w, w, torch.float32) == (0.0, 0.0, "")
    assert photometric_mismatch(w + 1e-5, w, torch.float32)[2] == ""
    assert "off by more than" in photometric_mismatch(w + 1e-4, w, torch.float32)[2]
    h = w.half()
    assert photometric_mismatch(h * (1 + 2**-11), h, torch.float16)[2] == ""  # rounds to h
    assert "off by more than" in photometric_mismatch(h * (1 + 2**-8), h, torch.float16)[2]
    u = (w * 250).to(torch.uint8)  # room for +2 without wrapping
    one = u.clone()
    one.view(-1)[0] += 1
    assert photometric_mismatch(one, u, torch.uint8)[2] == ""  # one level on 1/384 of values
    one.view(-1)[0] += 1
    assert "one level" in photometric_mismatch(one, u, torch.uint8)[2]
    many = u.clone()
    many.view(-1)[:20] += 1
    assert "% of values off" in photometric_mismatch(many, u, torch.uint8)[2]
    # after normalisation one level is 1/255/std: CIFAR's std 0.1994 makes it 0.0197, more than
    # ImageNet's 1/255/0.224 = 0.0175 (the rule without std), which flagged a correct kernel
    f = torch.zeros(384)
    cifar = f.clone()
    cifar[0] = 1 / 255 / 0.1994
    assert "one level" in photometric_mismatch(cifar, f, torch.uint8)[2]
    assert photometric_mismatch(cifar, f, torch.uint8, std=torch.tensor([0.2023, 0.1994, 0.2010]))[2] == ""
    assert photometric_mismatch(cifar, f, torch.uint8, std=(0.2470, 0.1994, 0.2616))[2] == ""
    assert "one level" in photometric_mismatch(cifar * 1.1, f, torch.uint8, std=(0.2470, 0.1994, 0.2616))[2]
    assert photometric_mismatch(f, f, torch.uint8, std=(-0.2, 0.25, 0.25))[2] == ""  # a legal negative std
    assert photometric_mismatch(cifar, f, torch.uint8, std=(-0.1994, 0.25, 0.25))[2] == ""
    n = w.clone()
    n[0, 0, 0, 0] = float("nan")
    assert photometric_mismatch(n, n.clone(), torch.float32)[2] == ""
    assert "NaN" in photometric_mismatch(n, w, torch.float32)[2]
    assert "vs" in photometric_mismatch(w, h, torch.float32)[2]


def test_gaussian_kernel_matches_torchvision():
    from torchvision.transforms.v2.functional._misc import _get_gaussian_kernel1d

    sig = torch.tensor([0.1, 0.7, 2.0, 5.0])
    for k in (1, 3, 23):
        ours = gaussian_kernel1d(k, sig)
        for i, s in enumerate(sig.tolist()):
            torch.testing.assert_close(ours[i], _get_gaussian_kernel1d(k, s, torch.float32, torch.device("cpu")),
                                       rtol=0, atol=1e-7)


def test_photometric_entry_point_and_exports():
    for name in ("PhotometricParams", "PhotometricSampler", "photometric"):
        assert name in ek.__all__ and hasattr(ek, name)
    p = ek.PhotometricSampler.simclr(blur_kernel=K, generator=torch.Generator().manual_seed(0)).sample(N)
    x = _images(torch.float32)
    # the fused kernel sums the contrast mean and the blur in its own order: float32 rounding apart
    torch.testing.assert_close(ek.photometric(x, p), photometric_reference(x, p), rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------------ sampler
def _params_equal(a, b):
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
            if not (isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) and torch.equal(u, v)):
                return False
        elif u != v:
            return False
    return True


def test_sampler_reproducible():
    def draw(seed):
        return PhotometricSampler.byol(2, generator=torch.Generator().manual_seed(seed)).sample(64)

    assert _params_equal(draw(0), draw(0))
    assert not _params_equal(draw(0), draw(1))
    s = PhotometricSampler(generator=torch.Generator().manual_seed(0))
    assert not _params_equal(s.sample(64), s.sample(64))  # the generator advances
    x = _images(torch.float32, n=64, seed=2)
    assert torch.equal(photometric_reference(x, draw(3)), photometric_reference(x, draw(3)))


@pytest.mark.parametrize(
    "preset,expect",
    [
        (lambda: PhotometricSampler.simclr(), dict(jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5, solarize_p=0.0)),
        (lambda: PhotometricSampler.byol(1), dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, solarize_p=0.0)),
        (lambda: PhotometricSampler.byol(2), dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2)),
        (lambda: PhotometricSampler.dino_global(1), dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, solarize_p=0.0)),
        (lambda: PhotometricSampler.dino_global(2), dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2)),
        (lambda: PhotometricSampler.dino_local(), dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.5, solarize_p=0.0)),
    ],
)
def test_presets(preset, expect):
    s = preset()
    for k, v in expect.items():
        assert getattr(s, k) == pytest.approx(v), k
    assert s.jitter_p == 0.8 and s.gray_p == 0.2 and s.blur_sigma == (0.1, 2.0) and s.blur_kernel == 23
    torch.manual_seed(0)
    n = 4000
    p = s.sample(n)
    p.check(n, "cpu")
    b, c, sat, h = s.jitter
    assert float(p.brightness.min()) >= 1 - b and float(p.brightness.max()) <= 1 + b
    assert float(p.saturation.min()) >= 1 - sat and float(p.saturation.max()) <= 1 + sat
    assert float(p.hue.abs().max()) <= h and float(p.hue.max()) > 0.9 * h and float(p.hue.min()) < -0.9 * h
    assert float(p.contrast.max()) > 1 + 0.9 * c
    blurred = p.blur_sigma > 0
    assert abs(blurred.float().mean().item() - s.blur_p) < 0.03
    assert float(p.blur_sigma[blurred].min()) >= 0.1 and float(p.blur_sigma.max()) <= 2.0
    assert abs(p.solarize.float().mean().item() - s.solarize_p) < 0.03
    assert abs(p.jitter_apply.float().mean().item() - 0.8) < 0.03
    assert abs(p.gray.float().mean().item() - 0.2) < 0.03
    assert len({tuple(r) for r in p.order.tolist()}) == 24  # every permutation occurs
    torch.testing.assert_close(p.mean, torch.tensor(IMAGENET_MEAN))


def test_jitter_strength_above_one_keeps_factors_non_negative():
    # ColorJitter draws brightness, contrast and saturation in [max(0, 1 - s), 1 + s] (audit 80:
    # dropping the max(0, .) passed every test; a negative factor is not a colour jitter)
    s = PhotometricSampler(jitter=(1.5, 1.5, 1.5, 0.1), generator=torch.Generator().manual_seed(0))
    p = s.sample(4000)
    for f in (p.brightness, p.contrast, p.saturation):
        assert float(f.min()) >= 0 and float(f.min()) < 0.05 and float(f.max()) > 2.4


def test_multi_view_presets_give_each_view_its_sampler():
    # BYOL / DINO: view 1 always blurred, never solarized; view 2 blurred at 0.1, solarized at 0.2
    for aug in (ek.MultiViewAugment.two_view(), ek.MultiViewAugment.dino()):
        first, second = aug.groups[0].sampler, aug.groups[1].sampler
        assert (first.blur_p, first.solarize_p) == (1.0, 0.0)
        assert (second.blur_p, second.solarize_p) == (0.1, 0.2)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(jitter_p=1.5), ValueError, "jitter_p"),
        (dict(gray_p=-0.1), ValueError, "gray_p"),
        (dict(blur_p=2), ValueError, "blur_p"),
        (dict(solarize_p=-1.0), ValueError, "solarize_p"),
        (dict(blur_sigma=(2.0, 0.1)), ValueError, "blur_sigma"),
        (dict(blur_sigma=(0.0, 1.0)), ValueError, "blur_sigma"),
        (dict(blur_sigma=(-1.0, 1.0)), ValueError, "blur_sigma"),
        (dict(blur_kernel=4), ValueError, "blur_kernel"),
        (dict(jitter=(0.4, 0.4, 0.4)), TypeError, "jitter"),
        (dict(jitter=(0.4, -0.4, 0.4, 0.1)), ValueError, "jitter"),
        (dict(jitter=(0.4, 0.4, 0.4, 0.6)), ValueError, "hue"),
        (dict(mean=(0.5, 0.5, 0.5), std=None), ValueError, "together"),
        (dict(std=(0.2, 0.0, 0.2)), ValueError, "std"),
        (dict(std=(0.2, float("nan"), 0.2)), ValueError, "finite"),  # until 2026-12-06: at first use
        (dict(mean=(0.5, float("inf"), 0.5)), ValueError, "finite"),
        (dict(std=(0.2, 1e-50, 0.2)), ValueError, "non-zero .*in float32"),
        (dict(mean=(0.5, 1e39, 0.5)), ValueError, "finite in float32"),
        (dict(generator=0), TypeError, "generator"),
    ],
)
def test_sampler_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PhotometricSampler(**kwargs)


def test_sample_errors():
    with pytest.raises(ValueError, match="sample: N must be at least 0"):
        PhotometricSampler().sample(-1)
    with pytest.raises(TypeError, match="sample: N must be an int"):
        PhotometricSampler().sample(2.0)
    with pytest.raises(ValueError, match="view"):
        PhotometricSampler.byol(3)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(brightness=torch.ones(N + 1)), ValueError, rf"for {N + 1} views, the views have N={N}"),
        (dict(contrast=torch.ones(N + 1)), ValueError, "contrast.*shape"),
        (dict(order=torch.arange(4).repeat(N, 1)[:, :3]), ValueError, "order.*shape"),
        (dict(order=torch.zeros(N, 4, dtype=torch.int64)), ValueError, "permutation"),
        (dict(order=torch.arange(4).repeat(N, 1).int()), TypeError, "int64"),
        (dict(gray=torch.zeros(N)), TypeError, "gray.*bool"),
        (dict(blur_sigma=torch.full((N,), -0.5)), ValueError, "blur_sigma"),
        (dict(contrast=torch.full((N,), -1.0)), ValueError, "contrast"),
        (dict(hue=torch.full((N,), 0.7)), ValueError, "hue"),
        (dict(blur_kernel=8), ValueError, "blur_kernel"),
        (dict(solarize_threshold=1.5), ValueError, "solarize_threshold"),
        (dict(solarize_threshold=torch.full((N,), -0.1)), ValueError, "solarize_threshold"),
        (dict(mean=torch.zeros(3)), ValueError, "together"),
        (dict(mean=torch.zeros(3), std=torch.zeros(3)), ValueError, "std"),
        (dict(mean=torch.zeros(4), std=torch.ones(4)), ValueError, "mean.*shape"),
        # float64 values that float32 (where the kernels normalise) turns into 0 or inf
        (dict(mean=torch.zeros(3, dtype=torch.float64), std=torch.full((3,), 1e-50, dtype=torch.float64)),
         ValueError, "std must be non-zero in float32"),
        (dict(mean=torch.full((3,), 1e39, dtype=torch.float64), std=torch.ones(3, dtype=torch.float64)),
         ValueError, "mean must be finite"),
        (dict(brightness=[1.0] * N), TypeError, "brightness"),
        (dict(brightness=torch.full((N,), float("nan"))), ValueError, "finite"),
        # per-sample float64 factors that are inf in float32: every output was NaN, silently
        (dict(saturation=torch.full((N,), 1e300, dtype=torch.float64)), ValueError, "saturation must be finite"),
        (dict(contrast=torch.full((N,), 1e300, dtype=torch.float64)), ValueError, "contrast must be finite"),
        (dict(blur_sigma=torch.full((N,), 1e300, dtype=torch.float64)), ValueError, "blur_sigma must be finite"),
    ],
)
def test_params_errors(change, exc, match):
    p = _identity()._replace(**change)
    with pytest.raises(exc, match=match):
        p.check(N, "cpu")
    with pytest.raises(exc, match=match):
        photometric_reference(_images(torch.float32), p)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(order=torch.tensor([[0, 1, 2, 3]] * (N - 1) + [[0, 1, 1, 3]])), "permutation"),
        (dict(blur_sigma=torch.tensor([0.0] * (N - 1) + [-0.5])), "blur_sigma"),
        (dict(contrast=torch.tensor([1.0] * (N - 1) + [-1.0])), "contrast"),
        (dict(saturation=torch.tensor([1.0] * (N - 1) + [float("inf")])), "saturation.*finite"),
        (dict(hue=torch.tensor([0.0] * (N - 1) + [-0.6])), "hue"),
        (dict(solarize_threshold=torch.tensor([0.5] * (N - 1) + [1.01])), "solarize_threshold"),
        (dict(mean=torch.zeros(3), std=torch.tensor([1.0, 0.0, 1.0])), "std"),
        (dict(mean=torch.tensor([0.0, float("nan"), 0.0]), std=torch.ones(3)), "mean.*finite"),
        (dict(brightness=torch.tensor([1.0] * (N - 1) + [float("nan")])), "finite"),
    ],
)
def test_values_ok_agrees_with_check(change, match):
    # values_ok() is the device-side (no sync) form of check()'s value rules: one bad value in the
    # last sample must turn it False exactly where check() raises.
    good = _identity()
    assert good.values_ok().item() is True
    bad = good._replace(**change)
    bad.check(N, "cpu", values=False)  # types and shapes are fine
    assert bad.values_ok().item() is False
    with pytest.raises(ValueError, match=match):
        bad.check(N, "cpu")


def test_edge_values_are_accepted():
    # the closed ends of the ranges: hue +-0.5 (ColorJitter's hue range is [-0.5, 0.5])
    p = _identity()._replace(hue=torch.tensor([0.5, -0.5] + [0.0] * (N - 2)))
    p.check(N, "cpu")
    assert p.values_ok().item() is True
    # a sampler that never blurs takes views smaller than its blur kernel
    PhotometricSampler.byol(1, blur_p=0.0).check_view_size(8, 8, "test")
    with pytest.raises(ValueError, match="too large"):
        PhotometricSampler.byol(1).check_view_size(8, 8, "test")


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_float64_sigma_that_is_zero_in_float32_does_not_blur(impl):
    # sigma 1e-50 passed "> 0" in float64 but is 0 in float32, where the Gaussian is built:
    # 0 / 0, every output NaN
    p = _identity()._replace(blur_sigma=torch.full((N,), 1e-50, dtype=torch.float64))
    x = _images(torch.float32)
    fn = photometric_reference if impl == "reference" else ek.photometric
    out = fn(x, p)
    assert not out.isnan().any()
    torch.testing.assert_close(out, fn(x, _identity()), rtol=0, atol=0)


def test_view_errors():
    p = _identity()
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        photometric_reference(torch.rand(N, 4, H, W), p)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        photometric_reference(torch.rand(3, H, W), p)
    with pytest.raises(TypeError, match="float32"):
        photometric_reference(torch.rand(N, 3, H, W, dtype=torch.float64), p)
    with pytest.raises(ValueError, match=rf"for {N} views, the views have N={N + 1}"):
        photometric_reference(torch.rand(N + 1, 3, H, W), p)  # N mismatch
    with pytest.raises(ValueError, match="reflect"):
        photometric_reference(torch.rand(N, 3, 4, 4), p._replace(blur_sigma=torch.ones(N)))


def test_reference_returns_a_new_contiguous_tensor_even_with_no_op(monkeypatch):
    # with every op off and no normalisation the reference returned its input itself (the
    # kernels return a new tensor: an in-place change of the output reached the input on the
    # reference backend only), and a sliced input came back non-contiguous
    from utils import make_layout, photometric_case
    x, params = photometric_case(2, 5, 6, torch.float32, ops=(), norm=False)
    for v in (x, make_layout(x, "sliced")):
        out = photometric_reference(v, params)
        assert out.is_contiguous() and out.data_ptr() != v.data_ptr()
        assert torch.equal(out, x)
    monkeypatch.setenv("EFFSSL_BACKEND", "reference")
    assert ek.photometric(x, params).data_ptr() != x.data_ptr()


def test_blur_sigma_spans_its_range():
    s = PhotometricSampler(blur_p=1.0, blur_sigma=(0.1, 2.0), generator=torch.Generator().manual_seed(0))
    sig = s.sample(4000).blur_sigma
    assert float(sig.min()) < 0.15 and float(sig.max()) > 1.95
    assert abs(float(sig.mean()) - 1.05) < 0.05  # uniform in [0.1, 2.0]


def test_sampler_passes_its_solarize_threshold():
    p = PhotometricSampler(solarize_p=1.0, solarize_threshold=0.25).sample(3)
    assert p.solarize_threshold == 0.25
    x = torch.full((3, 3, 4, 4), 0.3)
    out = ek.photometric(x, p._replace(jitter_apply=torch.zeros(3, dtype=torch.bool),
                                       gray=torch.zeros(3, dtype=torch.bool), blur_sigma=torch.zeros(3),
                                       mean=None, std=None))
    torch.testing.assert_close(out, torch.full_like(x, 0.7))  # 0.3 >= 0.25: inverted


def test_zero_factors_are_valid():
    # ColorJitter(brightness=1) draws factors in [0, 2]: 0 (black, gray or no contrast) is legal
    p = _identity()._replace(brightness=torch.zeros(N), contrast=torch.zeros(N), saturation=torch.zeros(N),
                             jitter_apply=torch.ones(N, dtype=torch.bool))
    p.check(N, "cpu")
    assert p.values_ok().item() is True
    out = ek.photometric(torch.rand(N, 3, 12, 12), p)
    assert torch.equal(out, torch.zeros_like(out))

"""photometric on the Triton path (EFFSSL_BACKEND=triton) against the reference.

On a GPU machine the kernels run on CUDA tensors; elsewhere on CPU tensors under
TRITON_INTERPRET=1 (conftest.py), so shapes stay tiny (the blur kernel is the slow one there).
Tolerances: utils.assert_photometric_close.
"""
import pytest
import torch

pytest.importorskip("triton")

import effssl_kernels as ek  # noqa: E402
from effssl_kernels.photometric import PhotometricSampler  # noqa: E402
from effssl_kernels.reference.photometric import photometric_reference  # noqa: E402
from utils import (HAS_GPU, INTERPRET, assert_photometric_close, make_layout, photometric_case,  # noqa: E402
                   solarize_tie_case)

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (HAS_GPU or INTERPRET), reason="needs a CUDA device or TRITON_INTERPRET=1"),
]

DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("EFFSSL_BACKEND", "triton")


def _run(x, params):
    got = ek.photometric(x.to(DEVICE), params.to(DEVICE))
    return got, photometric_reference(x, params)


def test_uint8_blur_rounds_half_to_even():
    from test_photometric_kernels import half_level_blur_case

    views, packed, weights, norm, want = half_level_blur_case()
    got = torch.ops.effssl_kernels._photometric_triton(views.to(DEVICE), packed.to(DEVICE), weights.to(DEVICE), norm)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue", "gray", "solarize"])
def test_each_pointwise_op(dtype, op):
    x, params = photometric_case(3, 5, 7, dtype, ops=(op,), norm=False, seed=len(op))
    got, want = _run(x, params)
    assert_photometric_close(got, want, dtype)
    if op != "hue":  # a random hue shift may leave some pixels unchanged, the others must change
        assert not torch.equal(got.cpu(), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_solarize_inverts_pixels_at_the_threshold(dtype):
    x, params, tie = solarize_tie_case(dtype)
    got, want = _run(x, params)
    assert_photometric_close(got, want, dtype)
    inv = 255 - x if dtype == torch.uint8 else 1 - x  # exact at the ties (0.75, 127)
    assert torch.equal(got.cpu()[tie], inv[tie])


@pytest.mark.parametrize("dtype", DTYPES)
def test_blur_alone_two_tiles_each_way(dtype):
    # 35 x 66 spans several 16 x 64 blur tiles in each direction; the tile edges and the reflect
    # padding at all four borders are exercised. One blurred sample keeps the interpreter quick.
    x, params = photometric_case(2, 35, 66, dtype, ops=("blur",), k=3, norm=False, seed=3)
    params = params._replace(blur_sigma=torch.tensor([0.0, 1.3]))
    got, want = _run(x, params)
    assert_photometric_close(got, want, dtype)
    assert torch.equal(got[0].cpu(), x[0])  # the unblurred sample passes through


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_chain(dtype):
    x, params = photometric_case(4, 6, 9, dtype, k=5, p=0.7, seed=5)
    got, want = _run(x, params)
    assert_photometric_close(got, want, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts(layout):
    x, params = photometric_case(3, 6, 8, torch.float32, k=3, seed=7)
    got = ek.photometric(make_layout(x, layout).to(DEVICE), params.to(DEVICE))
    assert_photometric_close(got, photometric_reference(x, params), torch.float32)
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def test_sampler_preset_reproducible():
    sampler = lambda: PhotometricSampler.byol(2, blur_kernel=3, generator=torch.Generator().manual_seed(0))  # noqa: E731
    x = (torch.rand(4, 3, 6, 7) * 255).to(torch.uint8)
    a = ek.photometric(x.to(DEVICE), sampler().sample(4, DEVICE))
    b = ek.photometric(x.to(DEVICE), sampler().sample(4, DEVICE))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert_photometric_close(a, photometric_reference(x, sampler().sample(4)), torch.uint8)


def test_blur_kernel_23_and_nan():
    # the presets' kernel size (23 taps, pad 11), one blurred sample; NaN pixels stay NaN
    x, params = photometric_case(2, 24, 30, torch.float32, ops=("blur", "brightness", "solarize"), k=23, seed=12)
    params = params._replace(blur_sigma=torch.tensor([1.7, 0.0]))
    x[1, :, 3, 4] = float("nan")
    got, want = _run(x, params)
    assert_photometric_close(got, want, torch.float32)
    assert bool(got[1, :, 3, 4].isnan().all())


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_nan_in_one_channel_with_hue_and_saturation(channel):
    # torch's max over channels makes the whole pixel NaN in hue; GPU min/max drop NaN operands
    x, params = photometric_case(2, 6, 7, torch.float32, ops=("hue", "saturation"), seed=21)
    params = params._replace(hue=torch.tensor([0.3, -0.2]))
    x[0, channel, 2, 3] = float("nan")
    got, want = _run(x, params)
    assert bool(want[0, :, 2, 3].isnan().all())
    assert_photometric_close(got, want, torch.float32)


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
@pytest.mark.parametrize("channel", [0, 1, 2])
def test_infinite_channel_with_hue(channel, value):
    # an infinite channel makes hue's s or h NaN (inf / inf): torch carries it into all three
    # channels, GPU min/max in the clamps would drop it
    x, params = photometric_case(2, 6, 7, torch.float32, ops=("hue",), seed=21, norm=False)
    params = params._replace(hue=torch.tensor([0.3, -0.2]), order=torch.tensor([[3, 0, 1, 2]] * 2))
    x[0, channel, 2, 3] = value
    got, want = _run(x, params)
    assert bool(want[0, :, 2, 3].isnan().all())
    assert_photometric_close(got, want, torch.float32)


def test_int32_offset_guard():
    # meta tensors: the guard reads only shapes and strides
    from effssl_kernels.triton.photometric import fit_int32_offsets

    crop = torch.empty_strided((2, 3, 224, 224), (3 * 2**30, 2**30, 2048, 1), device="meta")  # of a huge tensor
    out = torch.empty((2, 3, 224, 224), device="meta")
    assert fit_int32_offsets(crop, out).is_contiguous()  # copied, not refused
    big = torch.empty((2, 3, 1024, 1024), device="meta")  # 3M elements a sample: as is
    assert fit_int32_offsets(big, big) is big
    huge = torch.empty((1, 3, 27000, 27000), device="meta")
    with pytest.raises(ValueError, match="too large"):
        fit_int32_offsets(huge, huge)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16])
def test_large_image_several_stat_blocks(dtype):
    # 72 x 96 = 6912 pixels > one 4096-pixel stats block: the contrast mean adds two partial
    # sums; W = 96 is a multiple of 16 (the loads the GPU vectorises at 224 and 96 px)
    x, params = photometric_case(2, 72, 96, dtype, ops=("brightness", "contrast", "hue"), seed=13)
    got, want = _run(x, params)
    assert_photometric_close(got, want, dtype)


@pytest.mark.skipif(not HAS_GPU, reason="CUDA views with CPU parameters")
def test_compile_cuda_views_cpu_params():
    x, params = photometric_case(2, 16, 16, torch.uint8, k=3, seed=14)
    fn = torch.compile(ek.photometric, fullgraph=True)
    assert_photometric_close(fn(x.cuda(), params).cpu(), photometric_reference(x, params), torch.uint8)


def test_compile_fullgraph():
    x, params = photometric_case(2, 5, 6, torch.float32, k=3, seed=9)
    fn = torch.compile(ek.photometric, fullgraph=True, backend="eager")
    assert_photometric_close(fn(x.to(DEVICE), params.to(DEVICE)), photometric_reference(x, params), torch.float32)


@pytest.mark.skipif(not HAS_GPU, reason="host syncs exist only on a CUDA device")
def test_no_host_sync_with_cpu_params_and_pipeline():
    x = (torch.rand(8, 3, 64, 64) * 255).to(torch.uint8).cuda()
    params = PhotometricSampler.simclr(blur_kernel=7).sample(8)  # CPU, as a training loop draws them
    aug = ek.MultiViewAugment.two_view(size=48)
    ek.photometric(x, params), aug(x)  # warm-up: Triton compiles, the allocators fill
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ek.photometric(x, params)
        aug(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not HAS_GPU, reason="device allocations exist only on a CUDA device")
def test_pipeline_allocates_no_device_memory_after_warmup():
    # "allocation-light": after the first steps every buffer of a step (boxes, crops, packed
    # parameters, scratch, views) comes back from torch's caching allocator, so later steps add no
    # cudaMalloc (no new segments), the views of the previous step dropped as a training loop does.
    x = (torch.rand(8, 3, 80, 96) * 255).to(torch.uint8).cuda()
    aug = ek.MultiViewAugment.dino(num_local=4, global_size=64, local_size=32,
                                   generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        out = aug(x)
    del out
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["segment.all.allocated"]
    for _ in range(5):
        out = aug(x)
        del out
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["segment.all.allocated"] == before


def test_triton_op_rejects_an_even_blur_kernel():
    # an even kernel would blur off-centre (PAD = K // 2) without an error (audit 93)
    from effssl_kernels.ops.photometric import pack_params
    x, params = photometric_case(2, 6, 6, torch.float32, ops=("blur",), k=3, norm=False)
    packed, weights, _ = pack_params(params, 2)
    with pytest.raises(ValueError, match="odd"):
        torch.ops.effssl_kernels._photometric_triton(x.to(DEVICE), packed.to(DEVICE),
                                                     weights[:, :2].contiguous().to(DEVICE), None)


def test_zero_hue_shift_is_skipped():
    # ColorJitter skips a zero hue shift, and an rgb -> hsv -> rgb round trip is not bit-exact;
    # brightness alone (contrast and saturation at factor 1 are exact identities) is, on any device
    x, params = photometric_case(2, 5, 6, torch.float32, ops=("brightness",), norm=False, seed=4)
    params = params._replace(jitter_apply=torch.ones(2, dtype=torch.bool), hue=torch.zeros(2))
    got, want = _run(x, params)
    assert torch.equal(got.cpu(), want)


def test_three_stat_blocks_padded_partials_are_zero(monkeypatch):
    # 96 x 96 = 9216 px: 3 stats blocks of 4096, padded to 4 partial sums that the pointwise pass
    # adds too; the launcher's buffers are poisoned (NaN) so an uninitialised one shows
    import effssl_kernels.triton.photometric as tp

    class _PoisonedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*a, **k):
            t = torch.empty(*a, **k)
            return t.fill_(float("nan") if t.is_floating_point() else 77)

    monkeypatch.setattr(tp, "torch", _PoisonedTorch())
    x, params = photometric_case(2, 96, 96, torch.float32, ops=("contrast",), norm=False, seed=2)
    got, want = _run(x, params)
    assert_photometric_close(got, want, torch.float32)

"""Direct calls of the registered ops, bypassing the Python wrappers (torch.compile, export, saved
graphs and users can make them): the fakes and the Triton ops check their arguments as the C++
kernels do, and the C++ kernels check every index even when there is nothing to copy."""
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import effssl_kernels  # noqa: F401  (registers the ops)
from utils import INTERPRET

ops = torch.ops.effssl_kernels
pytestmark = pytest.mark.skipif(not hasattr(ops, "block_match"), reason="needs the compiled extension")


def _bad_calls():
    f = torch.rand
    tab = torch.zeros(2, 3, 3, dtype=torch.int64)
    order, offsets = torch.zeros(18, dtype=torch.int64), torch.zeros(9, dtype=torch.int64)
    params, blur = torch.zeros(1, 13), torch.zeros(1, 3)
    return {
        "block_match shapes": lambda: ops.block_match(f(1, 1, 8, 8), f(1, 1, 8, 9), 4, 2, 1.0, None, None),
        "block_match block 0": lambda: ops.block_match(f(1, 1, 8, 8), f(1, 1, 8, 8), 0, 2, 1.0, None, None),
        "gather_tokens float keep": lambda: ops.gather_tokens(f(2, 5, 3), torch.zeros(2, 2), None),
        "gather_tokens batch": lambda: ops.gather_tokens(f(2, 5, 3), torch.zeros(1, 2, dtype=torch.long), None),
        "gather_tokens pos": lambda: ops.gather_tokens(f(1, 5, 3), torch.zeros(1, 2, dtype=torch.long), f(1, 3)),
        "gather_tokens_backward dtype": lambda: ops.gather_tokens_backward(
            f(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 5, torch.int64, torch.float32, True, False),
        "halo_gather int32 table": lambda: ops.halo_gather(f(2, 3, 2, 2), tab.int(), order, offsets, 0.0),
        "halo_gather 3-D tiles": lambda: ops.halo_gather(f(2, 3, 2), tab, order, offsets, 0.0),
        "halo_gather_backward offsets": lambda: ops.halo_gather_backward(f(2, 3, 3, 3), order, offsets[:5], 2, 2, 2),
        "multi_crop out_h 0": lambda: ops.multi_crop(f(1, 3, 8, 8), torch.tensor([[[0., 0., 4., 4.]]]),
                                                     torch.zeros(1, 1, dtype=torch.bool), 0, 4, None),
        "patch_embed_gather channels": lambda: ops.patch_embed_gather(
            f(1, 2, 8, 8), f(5, 3, 4, 4), None, torch.tensor([[0, 3]]), None),
        "_gather_patches p 0": lambda: ops._gather_patches(f(1, 2, 8, 8), torch.tensor([[0, 3]]), 0, torch.float32),
        "_scatter_patches p 0": lambda: ops._scatter_patches(f(1, 2, 48), torch.tensor([[0, 3]]), 0, 8, 8, torch.float32),
        "photometric params": lambda: ops.photometric(f(1, 3, 8, 8), params[:, :12], blur, None),
        "photometric views": lambda: ops.photometric(f(1, 4, 8, 8), params, blur, None),
        "photometric even blur": lambda: ops.photometric(f(1, 3, 8, 8), params, blur[:, :2], None),
    }


@pytest.mark.parametrize("name", sorted(_bad_calls()))
def test_fake_impls_reject_what_the_kernels_reject(name):
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        _bad_calls()[name]()  # the C++ kernel (eager)
    with FakeTensorMode():  # the fake impl: what compile and export trace (fake arguments)
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            _bad_calls()[name]()


def test_fakes_trace_good_calls_with_the_kernels_strides():
    from effssl_kernels.sparse import TileIndex, pack
    from utils import random_mask

    mask = random_mask(2, 16, 16, 8, p=0.6, seed=0)
    idx = TileIndex.from_mask(mask, 8)  # 1 x 1 tiles
    for C in (1, 3):  # C == 1: channels-last strides differ from .contiguous(channels_last)'s
        tiles = pack(torch.randn(2, C, 2, 2), idx)
        table, (order, offsets) = idx.halo_table(1), idx.halo_inverse(1)
        real = ops.halo_gather(tiles, table, order, offsets, 0.0)
        real_b = ops.halo_gather_backward(real, order, offsets, *tiles.shape[:1], 1, 1)
        with FakeTensorMode() as mode:
            args = [mode.from_tensor(t) for t in (tiles, table, order, offsets)]
            fake = ops.halo_gather(*args, 0.0)
            fake_b = ops.halo_gather_backward(fake, args[2], args[3], tiles.shape[0], 1, 1)
        assert fake.shape == real.shape and fake.stride() == real.stride(), (C, fake.stride(), real.stride())
        assert fake_b.shape == real_b.shape and fake_b.stride() == real_b.stride()


def test_photometric_traces_right_after_import():
    # Its fake was registered only when effssl_kernels.photometric first ran eagerly: a direct op
    # call compiled in a fresh process failed "does not support running with fake tensors".
    code = (
        "import torch, effssl_kernels\n"
        "f = torch.compile(lambda v, p, w: torch.ops.effssl_kernels.photometric(v, p, w, None), "
        "fullgraph=True, backend='aot_eager')\n"
        "p = torch.zeros(2, 13); p[:, 4:8] = torch.arange(4.)\n"
        "v = torch.rand(2, 3, 8, 8)\n"
        "assert torch.equal(f(v, p, torch.ones(2, 1)), torch.ops.effssl_kernels.photometric(v, p, torch.ones(2, 1), None))\n"
        "print(hasattr(torch.ops.effssl_kernels, '_photometric_triton'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cpp_checks_every_index_when_nothing_is_copied():
    bad = torch.tensor([[0, 99], [1, 2]])
    with pytest.raises(RuntimeError, match=r"keep values must be in \[0, L\)"):
        ops.patch_embed_gather(torch.rand(2, 0, 8, 12), torch.rand(5, 0, 4, 4), torch.rand(5), bad, None)
    with pytest.raises(RuntimeError, match=r"keep values must be in \[0, L\)"):
        ops._gather_patches(torch.rand(2, 0, 8, 12), bad, 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"keep values must be in \[0, L\)"):
        ops._scatter_patches(torch.rand(2, 2, 48), bad, 4, 0, 12, torch.float32)
    assert ops._gather_patches(torch.rand(2, 0, 8, 12), torch.tensor([[0, 5], [1, 2]]), 4, torch.float32).shape == (2, 2, 0)
    with pytest.raises(TypeError, match="x_dtype and pos_dtype must be"):
        ops.gather_tokens_backward(torch.rand(1, 2, 0), torch.zeros(1, 2, dtype=torch.long), 5, torch.int64,
                                   torch.uint8, True, True)
    with pytest.raises(RuntimeError, match="too large"):
        ops.halo_gather_backward(torch.rand(1, 0, 1, 1), torch.zeros(0, dtype=torch.long),
                                 torch.zeros(1, dtype=torch.long), 2**62, 4, 1)
    with pytest.raises(RuntimeError, match="too large"):
        ops._gather_patches(torch.rand(1, 1, 0, 0), torch.zeros(1, 1, dtype=torch.long), 2**32, torch.float32)


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRET, reason="the Triton ops on CPU tensors need TRITON_INTERPRET=1")
def test_triton_ops_check_their_arguments_and_never_read_wild():
    pytest.importorskip("triton")
    g = torch.rand(3, 1, 1, 1)  # 3 padded pixels, read by 2 tiles of 1 x 1
    with pytest.raises(ValueError, match="keep has batch 1"):  # was: NaN for the second sample
        ops._gather_tokens_triton(torch.zeros(2, 5, 3), torch.tensor([[0, 4]]), None)
    with pytest.raises(ValueError, match="pos_embed must have shape"):  # was: a read past a 1-row view
        ops._gather_tokens_triton(torch.zeros(1, 5, 3), torch.tensor([[0, 4]]), torch.full((100, 3), 7.0)[:1])
    with pytest.raises(ValueError, match="channels"):
        ops._patch_embed_gather_triton(torch.rand(1, 2, 8, 8), torch.rand(5, 3, 4, 4), None, torch.tensor([[0, 3]]), None)
    with pytest.raises(ValueError, match="same shape"):
        ops._block_match_triton(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 4, 4), 4, 2, 1.0, None, None)
    # made-up inverse tables: NaN where a run or an entry is out of range (was a segfault)
    out = ops._halo_gather_backward_triton(g, torch.tensor([0, 1, 10**9]), torch.tensor([0, 2, 3]), 2, 1, 1)
    assert out[0].item() == pytest.approx(float(g[0] + g[1])) and out[1].isnan().all()
    out = ops._halo_gather_backward_triton(g, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 10**9]), 2, 1, 1)
    assert out[0].item() == pytest.approx(float(g[0])) and out[1].isnan().all()
    good = ops._halo_gather_backward_triton(g, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]), 2, 1, 1)
    assert good.flatten().tolist() == pytest.approx([float(g[0]), float(g[1] + g[2])])


def test_fake_shapes_on_a_non_square_grid():
    # opcheck and the compile tests all use square block grids: a fake returning [N, Wb, Hb]
    # passed them
    a, b = torch.rand(2, 3, 12, 20), torch.rand(2, 3, 12, 20)  # grid 3 x 5
    real = torch.ops.effssl_kernels.block_match(a, b, 4, 1, 1.0, None, None)
    with FakeTensorMode() as mode:
        fake = torch.ops.effssl_kernels.block_match(mode.from_tensor(a), mode.from_tensor(b), 4, 1, 1.0, None, None)
    assert [tuple(f.shape) for f in fake] == [tuple(r.shape) for r in real] == [(2, 3, 5), (2, 3, 5, 2)]
    torch.library.opcheck(torch.ops.effssl_kernels.block_match.default, (a, b, 4, 1, 1.0, None, None))

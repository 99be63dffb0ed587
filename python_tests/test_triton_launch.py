"""Launch-site rules of the Triton kernels that only a GPU would reveal, checked on the CPU.

- Every launch goes through ``torch.library.wrap_triton``: ``triton_op`` uses the launcher as the
  op's fake impl under ``torch.compile``, and a raw ``kernel[grid](...)`` asks a FakeTensor for its
  data pointer there (on a GPU; under the interpreter tests register explicit fakes, so they
  would not notice).
- Grids beyond CUDA's limits (axes 1 and 2 stop at 65535) raise a ValueError naming the op
  instead of failing the launch with "invalid argument" (the interpreter has no limit).
"""
import ast
import glob
import os

import pytest
import torch

pytest.importorskip("triton")

from effssl_kernels.triton import check_grid  # noqa: E402

TRITON_DIR = os.path.join(os.path.dirname(__file__), "..", "effssl_kernels", "triton")


def _jit_names(tree: ast.Module) -> set[str]:
    """Names of the module's ``@triton.jit`` functions."""
    out = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                d = d.func if isinstance(d, ast.Call) else d
                if isinstance(d, ast.Attribute) and d.attr == "jit":
                    out.add(node.name)
    return out


def test_every_triton_launch_is_wrapped():
    bad, launches = [], 0
    files = sorted(glob.glob(os.path.join(TRITON_DIR, "*.py")))
    assert len(files) >= 6
    for path in files:
        tree = ast.parse(open(path).read())
        jit = _jit_names(tree)
        for node in ast.walk(tree):
            # kernel[grid](...): a call of a subscript
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                launches += 1
                target = node.func.value
                if isinstance(target, ast.Name) and target.id in jit:
                    bad.append(f"{os.path.basename(path)}:{node.lineno} {target.id}[...]")
    assert launches >= 10  # the scan sees the launches (it would pass vacuously otherwise)
    assert not bad, f"raw Triton launches (wrap them in torch.library.wrap_triton): {bad}"


def test_check_grid():
    assert check_grid((2**31 - 1, 65535, 65535), "op") == (2**31 - 1, 65535, 65535)
    assert check_grid((7,), "op") == (7,)
    for grid, axis in (((2**31, 1), 0), ((1, 65536), 1), ((1, 1, 65536), 2)):
        with pytest.raises(ValueError, match=f"my_op: .* grid axis {axis}"):
            check_grid(grid, "my_op")


def test_gather_tokens_too_wide_raises_before_launch():
    from effssl_kernels.triton.gather_tokens import gather_tokens_fwd

    D = 65535 * 128 + 1  # one column block too many on axis 1 (stride-0 input: no memory)
    x = torch.zeros(1, 1, 1).expand(1, 1, D)
    with pytest.raises(ValueError, match="gather_tokens: .* grid axis 1"):
        gather_tokens_fwd(x, torch.zeros(1, 1, dtype=torch.int64), None)


def test_halo_gather_too_many_channels_raises_before_launch():
    from effssl_kernels.triton.halo_gather import halo_gather_fwd

    C = 65535 * 128 + 1
    tiles = torch.zeros(1, 1, 1, 1).expand(1, C, 1, 1)
    table = torch.zeros(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="halo_gather: .* grid axis 1"):
        halo_gather_fwd(tiles, table, 0.0)


def test_wrap_triton_hands_compile_a_traceable_kernel():
    """Compiled kernels (no interpreter) go to torch.library.wrap_triton; interpreted ones come
    back as they are (torch before 2.14 raised on them, so the whole interpreter suite failed)."""
    import subprocess
    import sys

    from effssl_kernels.triton import multi_crop, wrap_triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        assert wrap_triton(multi_crop._multi_crop_kernel) is multi_crop._multi_crop_kernel
    code = ("from effssl_kernels.triton import multi_crop, wrap_triton\n"
            "from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper\n"
            "w = wrap_triton(multi_crop._multi_crop_kernel)\n"
            "assert isinstance(w, TraceableTritonKernelWrapper), type(w)\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    for path in glob.glob(os.path.join(TRITON_DIR, "*.py")):
        if not path.endswith("__init__.py"):
            assert "library.wrap_triton" not in open(path).read(), f"{path}: use effssl_kernels.triton.wrap_triton"


def test_int32_index_limits_are_checked():
    from effssl_kernels.triton import check_int32

    check_int32("halo_gather", {"tile pixels": 2**31 - 1})
    with pytest.raises(ValueError, match=r"halo_gather backward: padded pixels = 2147483648 must be below 2\^31"):
        check_int32("halo_gather backward", {"padded pixels": 2**31})
    with pytest.raises(ValueError, match=r"patch_embed_gather \(Triton\): H = 2147418112 must be below 2\^31 - 2\^16"):
        check_int32("patch_embed_gather (Triton)", {"H": 2**31 - 2**16}, 2**31 - 2**16, "2^31 - 2^16")


# Each launcher passes the quantities its kernel indexes in int32 (a check of the right size in
# the wrong place would let the kernel wrap silently): stride-0 inputs reach the check, no memory.
def test_patch_gather_checks_the_number_of_patches():
    from effssl_kernels.triton.patch_embed_gather import gather_patches_triton

    # p = 1: L = H * W = 2^31 + 2^16 patches, each kept index cast to int32 by the kernel
    images = torch.zeros(1, 1, 1, 1).expand(1, 1, 65536, 32769)
    keep = torch.tensor([[2**31 + 5]])
    with pytest.raises(ValueError, match=r"patch_embed_gather \(Triton\): L = 2147549184 must be below"):
        gather_patches_triton(images, keep, 1, torch.float32)


def test_tile_conv_checks_weight_rows():
    from effssl_kernels.triton.tile_conv import tile_conv_fwd

    C = 2**28  # C * 3 * 3 weight rows pass 2^31
    tiles = torch.zeros(1, 1, 2, 2).expand(1, C, 2, 2)
    weight = torch.zeros(1, 1, 3, 3).expand(1, C, 3, 3)
    table = torch.zeros(1, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"tile_conv \(Triton\): C\*kh\*kw = 2415919104 must be below"):
        tile_conv_fwd(tiles, weight, None, table, (1, 1))


@pytest.mark.triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="launches one program under the interpreter")
def test_multi_crop_kernel_counts_output_pixels_in_int64():
    """OH * OW passed 2^31 at 46341 a side: no program stored and the caller got torch.empty's
    memory back. One program of the real launch (grid 1, a 256-pixel output) shows it."""
    from effssl_kernels.triton.multi_crop import _multi_crop_kernel

    img = torch.ones(1, 1, 4, 4)
    for side in (46340, 46341):
        out = torch.full((256,), -1.0)
        box = torch.tensor([[0.0, 0.0, 4.0, 4.0, 4 / side, 4 / side]])
        _multi_crop_kernel[(1,)](img, box, torch.zeros(1, dtype=torch.bool), out, 1, 1, 4, 4, side, side,
                                 *img.stride(), OUT_U8=False, BLOCK=256)
        assert (out == 1.0).all(), side


def test_halo_gather_checks_tile_and_padded_pixels():
    from effssl_kernels.triton.halo_gather import halo_gather_bwd, halo_gather_fwd

    # 2^27 tiles of 4 x 4 = 2^31 source pixels, split in int32 by the forward kernel
    tiles = torch.zeros(1, 1, 1, 1).expand(2**27, 1, 4, 4)
    with pytest.raises(ValueError, match=r"halo_gather: tile pixels = 2147483648 must be below 2\^31"):
        halo_gather_fwd(tiles, torch.zeros(1, 1, 1, dtype=torch.int64), 0.0)
    # R * ph * pw = 2^31 padded pixels, split in int32 by the backward kernel
    grad = torch.zeros(1, 1, 1, 1).expand(2**31, 1, 1, 1)
    with pytest.raises(ValueError, match=r"halo_gather backward: padded pixels = 2147483648 must be below 2\^31"):
        halo_gather_bwd(grad, torch.zeros(0, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 1, 1, 1)

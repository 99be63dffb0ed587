"""SimWnW.encode under two-process DDP (gloo, CPU): the wrapped model is called once per token
group (ViT, ``token_buckets=2``), once per view (ResNet) or once for both (``concat=True``), then
one backward. The averaged gradients must equal one process running both ranks' halves the same
way; the ViT is found inside the DDP wrapper and inside a larger model (encoder + head).

With BatchNorm and a call per view, DDP's default buffer broadcast at the second call rewrites
running statistics in place that the first call's backward saved: torch 2.11 raises ("modified
by an inplace operation"), torch 2.14 does not. Hence ``broadcast_buffers=False`` there (or
``concat=True``, one call), as SimWnW.encode's docstring says."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import effssl_kernels as ek

from test_simwnw import _cifar_resnet

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def _model(kind):
    torch.manual_seed(0)
    if kind == "resnet":
        return ek.sparsify(_cifar_resnet().double())
    import timm

    vit = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2,
                            num_classes=0)
    return torch.nn.Sequential(ek.sparsify_vit(vit), torch.nn.Linear(16, 4)).double()


SIMILAR_ROWS = (0, 3, 1, 1)  # block rows of each pair alike: kept counts 16, 4, 12, 12 of 16 blocks
# The ViT's model calls per rank: rank 0's pairs keep 16 and 4 blocks, two token groups (K 16
# and 8, multiple_of 8); rank 1's keep 12 and 12, one group. So the ranks run different numbers
# of forwards before one backward.
VIT_CALLS = (2, 1)


def _data():
    """4 pairs of views whose similar parts differ (:data:`SIMILAR_ROWS`)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(4, 3, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g)
    for n, rows in enumerate(SIMILAR_ROWS):
        b[n, :, : 8 * rows] = a[n, :, : 8 * rows]
    return a.double(), b.double()


def _step(model, a, b, concat):
    sw = ek.SimWnW(8, search_radius=0, use_geometry=False, token_buckets=2)
    m = sw.masks(a.float(), b.float())  # block_match takes no float64
    za, zb = sw.encode(model, a, b, m, concat=concat)
    (za.square().sum() + zb.sum()).backward()


def _worker(rank, world, init_file, out_dir, kind, concat):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _model(kind)
        calls = []
        model.register_forward_pre_hook(lambda m, args: calls.append(1))
        a, b = _data()
        half = slice(2 * rank, 2 * rank + 2)
        _step(DDP(model, broadcast_buffers=concat), a[half], b[half], concat)
        grads = {k: p.grad for k, p in model.named_parameters()}
        torch.save({"grads": grads, "calls": len(calls)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind,concat", [("vit", False), ("resnet", False), ("resnet", True)])
def test_ddp_encode_matches_averaged_halves(tmp_path, kind, concat):
    if kind == "vit":
        pytest.importorskip("timm")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), kind, concat), nprocs=2, join=True)
    model = _model(kind)
    a, b = _data()
    for half in (slice(0, 2), slice(2, 4)):
        _step(model, a[half], b[half], concat)
    want_calls = VIT_CALLS if kind == "vit" else (1, 1) if concat else (2, 2)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["calls"] == want_calls[r], f"{kind} rank {r}: {got['calls']} model calls"
        for k, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][k], p.grad / 2, msg=lambda m: f"{kind} rank {r} {k}: {m}")

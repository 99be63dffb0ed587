"""Two-process DDP (gloo, CPU) of a sparsified timm ViT in a SimSiam-style step, each rank
keeping its own number of tokens per view (DDP all-reduces the parameters' gradients whatever
the token count): each rank's gradients equal one process's average of the two halves'."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import effssl_kernels as ek

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

KEEP = {0: (0.5, 0.75), 1: (0.25, 0.5)}  # per rank: the two views' keep ratios (K = 8, 12 / 4, 8)


class _SimSiam(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = ek.sparsify_vit(timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=16, depth=2))
        self.pred = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 16))

    def forward(self, x1, x2, k1, k2):
        with ek.token_keep(k1):
            z1 = self.backbone(x1)
        with ek.token_keep(k2):
            z2 = self.backbone(x2)
        p1, p2 = self.pred(z1), self.pred(z2)
        return -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2


def _model():
    torch.manual_seed(0)
    return _SimSiam().double()


def _half(rank):
    g = torch.Generator().manual_seed(7)
    x1, x2 = (torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
    h = slice(2 * rank, 2 * rank + 2)
    k1, k2 = (ek.random_token_keep(2, 16, r, multiple_of=1, generator=torch.Generator().manual_seed(10 * v + rank))
              for v, r in enumerate(KEEP[rank]))
    return x1[h], x2[h], k1, k2


def _worker(rank, world, out_dir, find_unused):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _model()
        ddp = DDP(model, find_unused_parameters=find_unused)  # held: backward reaches it weakly
        ddp(*_half(rank)).backward()
        torch.save({k: p.grad for k, p in model.named_parameters()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_vit_with_a_token_count_per_rank_averages_the_halves(tmp_path, find_unused):
    mp.spawn(_worker, args=(2, str(tmp_path), find_unused), nprocs=2, join=True)
    halves = []
    for rank in range(2):
        m = _model()
        x1, x2, k1, k2 = _half(rank)
        assert k1.shape[1] == int(16 * KEEP[rank][0])  # the ranks' token counts differ
        m(x1, x2, k1, k2).backward()
        halves.append(dict(m.named_parameters()))
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got.keys() == halves[0].keys()
        for k, g in got.items():
            want = (halves[0][k].grad + halves[1][k].grad) / 2
            torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12, msg=k)

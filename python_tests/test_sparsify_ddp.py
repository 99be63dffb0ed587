"""Two-process DDP (gloo, CPU) of a sparsified ResNet: each rank runs its half of the batch with
its half of the mask.
- BatchNorm2d (per rank): the gradients equal one process's average of the two halves'
  gradients, and each rank's BatchNorm statistics equal that half's.
- SyncBatchNorm: statistics over the kept positions of both ranks, so outputs, gradients and
  running statistics equal one process running the whole batch with BatchNorm2d; checked with
  block 8 (every map packed), block 4 (layer4 masked-dense) and with rank 1 keeping no block
  (its sums are zeros, the other rank's statistics still come through). DDP refuses SyncBatchNorm on
  CPU modules, so there the gradients are all-reduced by hand, as DDP would."""
import copy
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from effssl_kernels.masks import BlockMask
from effssl_kernels.nn import resnet as R

from test_sparsify_resnet import _cifar_resnet, _randomize_bn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def _setup(seed=0, block=8, sync=False, empty_rank=False):
    torch.manual_seed(seed)
    model = _randomize_bn(_cifar_resnet()).double()
    if sync:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = R.sparsify(model)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    keep = torch.rand(4, 32 // block, 32 // block, generator=g) < 0.5
    keep[:, 0, 0] = True
    if empty_rank:
        keep[2:] = False  # rank 1's half
    return model, x, keep


def _step(model, x, keep, compiled=False):
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    with R.block_mask(BlockMask(keep, 32 // keep.shape[-1], 32)):
        y = run(x)
    y.square().mean().backward()  # outside the with: the mask was captured at forward
    return y.detach()


def _worker(rank, world, init_file, out_dir, block, sync, compiled=False, empty_rank=False):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        # torch.distributed.nn's all_reduce warns it is deprecated (torch 2.14): not used
        warnings.simplefilter("error", FutureWarning)
        model, x, keep = _setup(block=block, sync=sync, empty_rank=empty_rank)
        half = slice(2 * rank, 2 * rank + 2)
        if sync:  # DDP refuses SyncBatchNorm on CPU modules: average the gradients as it would
            y = _step(model, x[half], keep[half], compiled)
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        else:
            y = _step(DDP(model), x[half], keep[half])
        torch.save({"grads": {k: p.grad for k, p in model.named_parameters()},
                    "buffers": dict(model.named_buffers()), "out": y},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, block, sync, compiled=False, empty_rank=False):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), block, sync, compiled, empty_rank),
             nprocs=2, join=True)
    return [torch.load(tmp_path / f"{r}.pt") for r in range(2)]


# compiled: SyncBatchNorm's cross-rank sum through a traceable functional collective (the
# autograd all_reduce of torch.distributed.nn does not trace)
@pytest.mark.parametrize("block,compiled,empty_rank", [(8, False, False), (4, False, False), (8, True, False),
                                                      (8, False, True)])
def test_ddp_sync_batch_norm_equals_the_whole_batch(tmp_path, block, compiled, empty_rank):
    ranks = _spawn(tmp_path, block, sync=True, compiled=compiled, empty_rank=empty_rank)
    # one process, the whole batch, plain BN
    whole, x, keep = _setup(block=block, sync=False, empty_rank=empty_rank)
    y = _step(whole, x, keep)
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["out"], y[2 * r: 2 * r + 2], rtol=1e-10, atol=1e-12)
        for k, p in whole.named_parameters():
            torch.testing.assert_close(got["grads"][k], p.grad, rtol=1e-8, atol=1e-12,
                                       msg=lambda m, k=k: f"rank {r} grad {k}: {m}")
        for k, b in whole.named_buffers():
            torch.testing.assert_close(got["buffers"][k], b, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, k=k: f"rank {r} buffer {k}: {m}")


def test_ddp_two_ranks_match_averaged_halves(tmp_path):
    _spawn(tmp_path, 8, sync=False)
    model, x, keep = _setup()
    halves = []
    for r in range(2):
        m = copy.deepcopy(model)
        _step(m, x[2 * r: 2 * r + 2], keep[2 * r: 2 * r + 2])
        halves.append(m)
    for r in range(2):
        got = torch.load(tmp_path / f"{r}.pt")
        for k, p in model.named_parameters():
            want = (dict(halves[0].named_parameters())[k].grad
                    + dict(halves[1].named_parameters())[k].grad) / 2
            torch.testing.assert_close(got["grads"][k], want, rtol=1e-9, atol=1e-12,
                                       msg=lambda m, k=k: f"rank {r} grad {k}: {m}")
        for k, b in halves[r].named_buffers():
            torch.testing.assert_close(got["buffers"][k], b, rtol=1e-12, atol=0,
                                       msg=lambda m, k=k: f"rank {r} buffer {k}: {m}")
    # The halves differ, so the average is a real check of the all-reduce.
    g0 = halves[0].conv1.weight.grad
    assert not torch.allclose(g0, halves[1].conv1.weight.grad)

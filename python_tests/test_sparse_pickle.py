"""Sparsified models pickle and torch.save/torch.load by name (nn._swap): the swapped classes
are made at run time, and a process that has not made them yet rebuilds them on load."""
import io
import pickle

import pytest
import torch
from torch import nn

from effssl_kernels.masks import BlockMask
from effssl_kernels.nn import _swap
from effssl_kernels.nn import resnet as R

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, ResNet  # noqa: E402


def _model():
    m = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem
    m.maxpool = nn.Identity()
    R.sparsify(m, example_input=torch.zeros(1, 3, 32, 32))
    return m.eval()


def _outputs(m, x, mask):
    with torch.no_grad(), R.block_mask(mask):
        return m(x)


def _check_same(m, loaded):
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[[True, False], [False, True]], [[True, True], [False, False]]])
    mask = BlockMask(keep, 16, 32)
    assert R.is_sparse(loaded)
    assert [type(a) for a in m.modules()] == [type(b) for b in loaded.modules()]
    assert torch.equal(_outputs(m, x, mask), _outputs(loaded, x, mask))
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))  # no mask: the untouched model


def test_pickle_round_trip():
    m = _model()
    _check_same(m, pickle.loads(pickle.dumps(m)))


def test_torch_save_load():
    m = _model()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    _check_same(m, torch.load(buf, weights_only=False))


def test_load_rebuilds_classes_not_made_yet():
    """As in a fresh process: the classes are not in the cache when the pickle is read."""
    m = _model()
    data = pickle.dumps(m)
    saved = dict(_swap._SPARSE_CLASSES)
    _swap._SPARSE_CLASSES.clear()
    try:
        loaded = pickle.loads(data)
        made = set(_swap._SPARSE_CLASSES.values())
    finally:
        _swap._SPARSE_CLASSES.clear()
        _swap._SPARSE_CLASSES.update(saved)
    conv = loaded.layer1[0].conv1
    assert type(conv) in made and type(conv) is not type(m.layer1[0].conv1)
    assert type(conv).__name__ == "SparseConv2d" and type(conv)._effssl_base is nn.Conv2d
    x = torch.randn(2, 3, 32, 32)
    mask = BlockMask(torch.tensor([[[True, False], [True, True]]] * 2), 16, 32)
    assert torch.equal(_outputs(m, x, mask), _outputs(loaded, x, mask))
    R.unsparsify(loaded)
    assert type(loaded.layer1[0].conv1) is nn.Conv2d


def test_unknown_names_are_attribute_errors():
    assert not hasattr(_swap, "Sparse")
    assert not hasattr(_swap, "Sparse[torch:nn/Nope+torch:nn/Conv2d]")
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        _swap.Nope  # noqa: B018


def test_sparse_vit_torch_save_round_trip():
    timm = pytest.importorskip("timm")
    import effssl_kernels as ek

    torch.manual_seed(0)
    m = ek.sparsify_vit(timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=1,
                                          embed_dim=16, num_heads=2, num_classes=0)).eval()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert ek.is_sparse_vit(loaded) and type(loaded) is type(m)
    x = torch.rand(2, 3, 32, 32)
    keep = torch.tensor([[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]])
    with torch.no_grad(), ek.token_keep(keep):
        assert torch.equal(loaded(x), m(x))

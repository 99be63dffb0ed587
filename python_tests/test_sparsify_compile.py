"""torch.compile(fullgraph=True) of a sparsified ResNet: at most two graphs for every mask (the
first specialises on the first tile count, the second makes it dynamic; no recompile after),
equal to eager in outputs and gradients; with aot_eager and with Inductor."""
import copy

import pytest
import torch

import effssl_kernels as ek
from effssl_kernels.masks import BlockMask
from effssl_kernels.nn import _state, resnet as R
from effssl_kernels.sparse import conv as conv_mod

from test_sparsify_resnet import _cifar_resnet, _randomize_bn
from utils import EXPORT_STRICT_BY_DEFAULT, TORCH_REFUSES_FREE_TENSORS


@pytest.mark.parametrize("backend,mirrored", [("aot_eager", False), ("inductor", False), ("aot_eager", True)])
def test_compiled_sparse_resnet_one_graph_for_all_masks(backend, mirrored, monkeypatch):
    # mirrored: the mask read through nn/_state.py's mirror, as on torch < 2.14
    from effssl_kernels.nn import _state

    if not mirrored and torch.__version__ < "2.14":
        pytest.skip("this torch's Dynamo cannot trace ContextVar.get: the mirror is what it uses")
    monkeypatch.setattr(_state, "_MIRRORED", mirrored)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    # float64: in float32 the packed (eager) and per-layer (compiled) paths round differently,
    # and BatchNorm's backward on an untrained net amplifies that to ~1% at some steps.
    eager = R.sparsify(_randomize_bn(_cifar_resnet()).double())
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    graphs = []
    for step, p in enumerate((0.3, 0.6, 0.9)):
        keep = torch.rand(2, 4, 4, generator=g) < p
        keep[:, 0, 0] = True
        with R.block_mask(BlockMask(keep, 8, 32)):  # a fresh mask per step, as in training
            ye = eager(x)
        with R.block_mask(BlockMask(keep, 8, 32)):
            yc = compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-9, atol=1e-10)
        ye.square().sum().backward()
        yc.square().sum().backward()
        for (k, pe), pc in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-8, atol=1e-10,
                                       msg=lambda m, k=k: f"step {step} {k}: {m}")
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] <= 2 and graphs[-1] == graphs[-2]  # the third mask compiles nothing


def _assert_same(ys, eager, model):
    """Compiled (``ys[1]``, ``model``'s gradients) equal to eager (``ys[0]``, ``eager``'s), in float64."""
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-9, atol=1e-10)
    for (k, pe), pc in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-8, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("form", ["BlockMask", "keep"])
def test_compiled_resnet_with_masked_dense_layers(form):
    """Block 4 at 32 px: layer4 (stride 8) is not tile-aligned and runs masked-dense, where a
    stride-1 conv's input and output pixel masks are one cached tensor (Dynamo refused that
    tensor given twice to the masked conv's Function, under fullgraph)."""
    torch._dynamo.reset()
    eager = R.sparsify(_randomize_bn(_cifar_resnet()).double())
    model = copy.deepcopy(eager)
    assert R.tile_plan(eager, 4, 32)["layer4.0.conv2"] == "masked-dense"
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    keep = torch.rand(2, 8, 8, generator=g) < 0.5
    keep[:, 0, 0] = True
    arg = BlockMask(keep, 4, 32) if form == "BlockMask" else keep
    ys = []
    for net in (eager, compiled):
        with R.block_mask(arg, 4):
            y = net(x)
        y.square().sum().backward()
        ys.append(y)
    _assert_same(ys, eager, model)


def test_compiled_under_inference_mode_with_a_mask_made_there():
    # A BlockMask made under inference mode had no version counter to note, and the mask the
    # trace makes read it as a graph op, which the eager backend then ran on an inference tensor.
    torch._dynamo.reset()
    model = R.sparsify(_randomize_bn(_cifar_resnet())).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    keep = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.inference_mode():
        mask = BlockMask(keep, 8, 32)
        with R.block_mask(mask):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_zero_breaking_ops_agree_eager_and_compiled():
    """sigmoid, x + 1, 1 - x, clamp(min > 0) of a masked map turn removed zeros into non-zeros:
    eager (packed maps) and compiled (dense maps per layer) both give the dense op's result on
    the dense masked map, so a consumer that is not a layer (a sum) sees the same numbers; the
    masked pool after them reads only kept positions."""
    import warnings

    from torch import nn

    from effssl_kernels.reference.masked_net import (
        masked_avg_pool_reference,
        masked_conv2d_reference,
    )
    from effssl_kernels.sparse.packed import as_dense

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool = nn.Conv2d(3, 4, 3, 1, 1), nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            h = self.conv(x)
            z = torch.sigmoid(h)
            return self.pool(z), z, h + 1, 1 - h, h.clamp(min=0.5), torch.relu(h)

    torch._dynamo.reset()
    eager = R.sparsify(Net().double(), example_input=torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    keep = torch.tensor([[[True, False], [False, False]]])
    mask = BlockMask(keep, 8, 16)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager unpacks after the zero-breaking ops
        with R.block_mask(keep, 8):
            ye = [as_dense(t) for t in eager(x)]
    with R.block_mask(keep, 8):
        yc = compiled(x)
    h = masked_conv2d_reference(x, eager.conv.weight, eager.conv.bias, 1, 1, mask=mask)
    want = [masked_avg_pool_reference(torch.sigmoid(h), mask.pixel_mask(1, (16, 16))).view(1, 4, 1, 1),
            torch.sigmoid(h), h + 1, 1 - h, h.clamp(min=0.5), torch.relu(h)]
    for i, (a, b, w) in enumerate(zip(ye, yc, want)):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12, msg=lambda m, i=i: f"eager {i}: {m}")
        torch.testing.assert_close(b, w, rtol=1e-12, atol=1e-12, msg=lambda m, i=i: f"compiled {i}: {m}")
    torch.testing.assert_close(ye[1].flatten(1).sum(1), yc[1].flatten(1).sum(1))


@pytest.mark.parametrize("form", ["BlockMask", "keep"])
def test_two_compiled_calls_per_mask_compile_nothing_after_the_first_masks(form):
    """An EMA teacher, or a second view, calls a compiled model again under the same mask. The
    traced code read and filled the mask's caches (pixel masks, tile indices, tables), so the
    second call found them filled and Dynamo, which guards on what a cache holds, recompiled for
    every new tile count until fullgraph=True hit the recompile limit. In a trace nothing past
    the kept list (prepared on entering the `with`) is cached now."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = R.sparsify(_randomize_bn(_cifar_resnet()).double())
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    graphs = []
    for T in (5, 9, 12, 7, 10, 13, 6):  # under 16: the CPU conv's backend choice guards there
        keep = torch.zeros(32, dtype=torch.bool)
        keep[torch.randperm(32, generator=g)[:T]] = True
        keep = keep.view(2, 4, 4)
        mask = BlockMask(keep, 8, 32)
        with R.block_mask(*((mask,) if form == "BlockMask" else (keep, 8))):
            yc = [compiled(x), compiled(x.flip(-1))]
            with torch.no_grad():
                compiled(x)
        with R.block_mask(BlockMask(keep, 8, 32)):  # eager fills its mask's caches
            ye = [eager(x), eager(x.flip(-1))]
        for a, e in zip(yc, ye):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
        if form == "BlockMask":
            assert set(mask._tile_indices) == {"base"} and not mask._cache  # nothing traced kept
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[2] <= 4, graphs  # grad and no_grad, each static then dynamic


def _tiny_net():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 1, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.skipif(not conv_mod._TRACES_KNOWN_TRUE, reason="Dynamo < 2.8 cannot trace statically_known_true")
def test_inductor_backward_of_a_batch_that_keeps_no_block():
    # Inductor's backward of a conv over a batch of 0 fails an assertion (torch 2.14: "expected
    # size 16==16, stride 1==9"), F.conv2d alone too: a step keeping no tile crashed. The tiled
    # conv of no tiles is now zeros of the right shape, without a conv.
    eager = R.sparsify(_tiny_net(), example_input=torch.zeros(1, 3, 32, 32))
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    keep = torch.zeros(2, 4, 4, dtype=torch.bool)
    with R.block_mask(keep, 8):
        yc = compiled(x)
    with R.block_mask(keep, 8):
        ye = eager(x)
    torch.testing.assert_close(yc, ye)
    yc.square().sum().backward()
    ye.square().sum().backward()
    for (k, pe), pc in zip(eager.named_parameters(), model.parameters()):
        assert pc.grad is not None, k
        torch.testing.assert_close(pc.grad, pe.grad, msg=lambda m, k=k: f"{k}: {m}")
    assert model[0].weight.grad.abs().sum() == 0  # nothing kept: no weight sees a pixel


@pytest.mark.parametrize("weight_shape,stride,halo,dilation", [
    ((6, 4, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), ((6, 4, 3, 3), (2, 2), (1, 0, 1, 0), (1, 1)),
    ((6, 4, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1)), ((6, 4, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    ((6, 4, 7, 7), (2, 2), (3, 2, 3, 2), (1, 1))])
def test_the_conv_of_no_tiles_is_the_conv_of_an_empty_batch(weight_shape, stride, halo, dilation):
    from effssl_kernels.sparse.conv import _no_tiles

    left, right, top, bottom = halo
    tiles = torch.zeros(0, 4, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(weight_shape, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = _no_tiles(tiles, w, b, stride, halo, dilation, 1)
            want = torch.nn.functional.conv2d(
                torch.nn.functional.pad(tiles, (left, right, top, bottom)), w, b, stride, 0, dilation)
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
        gt, gw, gb = torch.autograd.grad(got.sum(), (tiles, w, b))
        assert gt.shape == tiles.shape and not gw.any() and not gb.any()
    # what F.conv2d refuses is refused (sparse_conv2d's ValueError), whatever the mask keeps
    assert _no_tiles(tiles.double(), w, b, stride, halo, dilation, 1) is None
    assert _no_tiles(tiles, w[:, :3], b, stride, halo, dilation, 1) is None
    assert _no_tiles(tiles, w, b, stride, halo, dilation, 2) is None  # 4 input channels, not 2 * 4
    assert _no_tiles(tiles, w, b[:5], stride, halo, dilation, 1) is None
    mask = BlockMask(torch.zeros(2, 2, 2, dtype=torch.bool), 8, 16)
    for wrong in (torch.randn(5, 3, 3, 3), torch.randn(5, 2, 3, 3)):
        with pytest.raises(ValueError, match="needs an input of"):
            ek.sparse_conv2d(torch.randn(2, 4, 16, 16), wrong, None, 1, 1, groups=2 if wrong.shape[1] == 2 else 1,
                             mask=mask)


class _Masked(torch.nn.Module):
    """Export wrapper: the keep grid is an input and the `with` is inside forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, keep):
        with R.block_mask(keep, 8):
            return self.model(x)


def test_export_records_no_mask_entered_outside_it():
    """torch.export of a model called in a `with` entered outside the export made the mask's
    tensors constants of the program, which then applied that one mask to every later call,
    silently. It raises now; a wrapper that takes the keep as an input exports and generalises."""
    model = R.sparsify(_randomize_bn(_cifar_resnet())).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    k1, k2 = torch.rand(2, 4, 4, generator=g) < 0.5, torch.rand(2, 4, 4, generator=g) < 0.3
    with R.block_mask(k1, 8):
        with pytest.raises(RuntimeError, match="torch.export of a model called inside a block_mask"):
            torch.export.export(model, (x,), strict=False)
        if EXPORT_STRICT_BY_DEFAULT and not _state._DYNAMO_KNOWS_EXPORT:
            # torch < 2.8 exports strictly by default; Dynamo refuses the mask's free tensors (2.6:
            # it fails earlier, on sparsify's forward pre-hook, inside a `with` or not)
            with pytest.raises(Exception, match=TORCH_REFUSES_FREE_TENSORS
                               + "|whole graph export entails exactly one guard export"):
                torch.export.export(model, (x,))
        if _state._DYNAMO_KNOWS_EXPORT:
            # strict export traces with Dynamo, which skipped the guard: the mask was baked in
            with pytest.raises(Exception, match="torch.export of a model called inside a block_mask"):
                torch.export.export(model, (x,), strict=True)
    with R.block_mask(k2, 8):
        want2 = model(x)
    ep = torch.export.export(_Masked(model), (x, k1), strict=False)
    for keep in (k2, k1):
        with R.block_mask(keep, 8):
            want = model(x)
        torch.testing.assert_close(ep.module()(x, keep), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, want2, atol=1e-3)  # the two masks differ in the output
    with R.block_mask(k2, 8):  # and the exports left the eager model as it was
        torch.testing.assert_close(model(x), want2)


def test_strict_export_outside_a_with_is_the_dense_model():
    """Outside any `with` a sparsified model is the dense one, and a strict (Dynamo) export of
    it says so. Before torch 2.8 (strict by default there) Dynamo's export refuses any forward
    pre-hook on the exported module, sparsify's among them: README tells to pass strict=False."""
    model = R.sparsify(_randomize_bn(_cifar_resnet())).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if EXPORT_STRICT_BY_DEFAULT:
        with pytest.raises(AssertionError, match="whole graph export entails exactly one guard export"):
            torch.export.export(model, (x,), strict=True)
    else:
        ep = torch.export.export(model, (x,), strict=True)
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.export.export(model, (x,), strict=False).module()(x), model(x),
                               rtol=1e-5, atol=1e-5)


def test_export_guard_is_per_thread():
    # torch.compiler.is_exporting() is one flag for the process: another thread's export made an
    # eager call here raise (a), or a `with` entered meanwhile pass for one entered inside the
    # export, so this thread's export baked its mask in (b).
    import threading

    from torch import nn

    model = R.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU()),
                       example_input=torch.zeros(1, 3, 16, 16)).eval()
    x, keep = torch.randn(2, 3, 16, 16), torch.rand(2, 2, 2) < 0.5

    def export_in_another_thread():
        inside, release = threading.Event(), threading.Event()

        class Waits(nn.Module):
            def forward(self, x):
                inside.set()
                release.wait(60)
                return x + 1

        # non-strict: Dynamo (strict, torch < 2.8's default) cannot trace the Event
        t = threading.Thread(target=lambda: torch.export.export(Waits(), (torch.randn(2),), strict=False))
        t.start()
        assert inside.wait(60)
        return lambda: (release.set(), t.join())

    with R.block_mask(keep, 8):
        done = export_in_another_thread()
        try:
            model(x)  # (a)
        finally:
            done()
    done = export_in_another_thread()
    with R.block_mask(keep, 8):
        done()
        with pytest.raises(RuntimeError, match="torch.export of a model called inside a block_mask"):
            torch.export.export(model, (x,), strict=False)  # (b)


def test_a_trace_builds_each_tile_table_once(monkeypatch):
    # Caching nothing in a trace rebuilt every table in every layer (graphs twice the size, and
    # slower compiles); the trace's own copy of the mask caches them for the forward's layers.
    # Tables are built from aranges: the traced forward has as many as an eager one on the
    # path compiled code takes (each layer dense in, dense out).
    from torch.overrides import TorchFunctionMode

    import effssl_kernels.sparse.packed as P

    class CountAranges(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            CountAranges.n += func is torch.arange
            return func(*args, **(kwargs or {}))

    model = R.sparsify(_cifar_resnet())
    keep = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    x = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(P, "packing_enabled", lambda: False)
    with R.block_mask(BlockMask(keep, 8, 32)), CountAranges():
        model(x)
    monkeypatch.undo()
    traced = []

    def backend(gm, example_inputs):
        traced.append(sum(n.target is torch.arange for n in gm.graph.nodes))
        return gm.forward

    for form in ((BlockMask(keep, 8, 32),), (keep, 8)):
        torch._dynamo.reset()
        with R.block_mask(*form):
            torch.compile(model, backend=backend, fullgraph=True)(x)
    assert traced == [CountAranges.n] * 2, (traced, CountAranges.n)


def _layer2_checkpointed(model, mode):
    """The cifar ResNet's forward with layer2 checkpointed (``mode``), for compiling. Layer2 is
    the first at stride 2: its tile tables are first built inside the checkpoint."""
    import torch.utils.checkpoint as C

    def f(x):
        h = model.layer1(model.relu(model.bn1(model.conv1(x))))
        if mode == "masked":
            h = ek.masked_checkpoint(model.layer2, h)
        else:
            h = C.checkpoint(model.layer2, h, use_reentrant=False)
        h = model.layer4(model.layer3(h))
        return model.fc(torch.flatten(model.avgpool(h), 1))

    return f


@pytest.mark.parametrize("mode,fullgraph", [("masked", True), ("plain", False)])
def test_checkpoint_inside_compiled_code(mode, fullgraph):
    """masked_checkpoint inside compiled code is a plain call (fullgraph works); a plain
    torch.utils.checkpoint there runs eagerly (Dynamo cannot trace a masked layer's checkpoint)
    and hands a PackedMap back to compiled code, which crashed Dynamo before PackedMap was
    registered as a subclass it must not trace."""

    if not fullgraph and torch.__version__ < "2.12":
        pytest.skip("Dynamo before torch 2.12 guards on a PackedMap's dense shape (README)")
    torch._dynamo.reset()
    eager = R.sparsify(_randomize_bn(_cifar_resnet()).double())
    model = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    keep = torch.rand(2, 4, 4, generator=g) < 0.5
    keep[:, 0, 0] = True
    compiled = torch.compile(_layer2_checkpointed(model, mode), backend="aot_eager", fullgraph=fullgraph)
    ys = []
    for f in (_layer2_checkpointed(eager, mode), compiled):
        with R.block_mask(keep, 8):
            y = f(x)
            if mode == "plain":  # a plain checkpoint recomputes under the mask in force
                y.square().sum().backward()
        if mode == "masked":  # outside the with: masked_checkpoint's recomputation has the mask
            y.square().sum().backward()
        ys.append(y)
    _assert_same(ys, eager, model)


def test_packed_map_into_a_region_compiled_on_its_own():
    """Regional compilation: an eager layer's PackedMap given to a compiled block (Dynamo's
    AssertionError 'Guard failed on the same frame' before); the block runs eagerly, same values."""

    if torch.__version__ < "2.12":
        pytest.skip("Dynamo before torch 2.12 guards on a PackedMap's dense shape (README)")
    torch._dynamo.reset()
    model = R.sparsify(_randomize_bn(_cifar_resnet()).double())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keep = torch.ones(2, 4, 4, dtype=torch.bool)
    keep[0, 1, 2] = False
    block = torch.compile(model.layer1, backend="aot_eager")
    with R.block_mask(keep, 8):
        h = model.relu(model.bn1(model.conv1(x)))
        assert isinstance(h, ek.sparse.PackedMap)
        want = model.layer1(h).to_dense()
        got = block(h)
    torch.testing.assert_close(as_dense_(got), want, rtol=1e-12, atol=1e-12)


def as_dense_(t):
    return t.to_dense() if isinstance(t, ek.sparse.PackedMap) else t



def test_masked_checkpoint_of_vit_blocks_saves_memory_inside_compiled_code():
    """Under token_keep only (no block_mask) masked_checkpoint is torch.utils.checkpoint inside
    compiled code too: traced, recomputed in the graph's backward (a plain call kept every
    activation), with backward outside the `with` right."""
    timm = pytest.importorskip("timm")
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    backend = aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g,
                           partition_fn=min_cut_rematerialization_partition)
    torch.manual_seed(0)
    vit = ek.sparsify_vit(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=0))
    x = torch.randn(2, 3, 64, 64)
    keep = ek.random_token_keep(2, 16, keep_ratio=0.5, generator=torch.Generator().manual_seed(0))

    def model(ckpt):
        def f(x):
            h = vit._pos_embed(vit.patch_embed(x))
            for blk in vit.blocks:
                h = ckpt(blk, h)
            return vit.norm(h)
        return f

    params = {p.data_ptr() for p in vit.parameters()}

    def run(f):
        n = [0]

        def pack(t):  # activations only (the weights every variant saves dominate at this size)
            if t.data_ptr() not in params:
                n[0] += t.numel() * t.element_size()
            return t

        with ek.token_keep(keep), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = f(x)
        vit.zero_grad()
        y.square().sum().backward()  # outside the with
        return y, vit.patch_embed.proj.weight.grad.clone(), n[0]

    torch._dynamo.reset()
    y0, g0, _ = run(model(ek.masked_checkpoint))  # eager
    _, _, plain = run(torch.compile(model(lambda blk, h: blk(h)), backend=backend, fullgraph=True))
    torch._dynamo.reset()
    y1, g1, ckpt = run(torch.compile(model(ek.masked_checkpoint), backend=backend, fullgraph=True))
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5)
    assert ckpt < 0.6 * plain, (ckpt, plain)


def test_export_in_training_updates_masked_dense_running_stats():
    # A map of another size than the mask's runs masked-dense BN, whose running-stat update must
    # survive export: written through `.data` (briefly, 2026-12-06) torch 2.11's export failed
    # ("fake tensor in the exported program constant's list") and 2.6's dropped it silently.
    torch.manual_seed(0)
    base = R.sparsify(_randomize_bn(_cifar_resnet())).train()
    x, keep = torch.randn(2, 3, 33, 33), torch.rand(2, 4, 4) < 0.6  # 33 px: not the mask's 32
    eager = copy.deepcopy(base)
    _Masked(eager)(x, keep)
    ep = torch.export.export(_Masked(copy.deepcopy(base)), (x, keep), strict=False)
    mod = ep.module()
    mod(x, keep)
    want, got = dict(eager.named_buffers()), dict(mod.model.named_buffers())
    running = [k for k in want if "running" in k]
    assert running and all(not torch.equal(want[k], dict(base.named_buffers())[k]) for k in running)
    for k in running:
        torch.testing.assert_close(got[k], want[k], msg=k)

"""sparsify_vit / token_keep on timm VisionTransformer: equal to timm's own blocks on the kept tokens."""
import copy
import threading
import warnings

import pytest
import torch
from torch import nn

import effssl_kernels as ek
from effssl_kernels.nn import _state, vit as vit_mod
from utils import EXPORT_STRICT_BY_DEFAULT, TORCH_REFUSES_FREE_TENSORS

timm = pytest.importorskip("timm")


class _ScaleNorm(nn.Module):
    """A patch-embed norm the converter cannot prove token-wise: takes the unfused fallback."""

    def __init__(self, dim, **kw):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.weight


VARIANTS = {
    "cls": {},
    "reg4": {"reg_tokens": 4},
    "no_embed_class": {"no_embed_class": True},
    "reg2_no_embed_class": {"reg_tokens": 2, "no_embed_class": True},
    "no_class_token": {"class_token": False, "global_pool": "avg"},
    "no_class_token_reg": {"class_token": False, "reg_tokens": 1, "global_pool": "avg"},
    "no_pos_embed": {"pos_embed": "none"},
    "dynamic_img_size": {"dynamic_img_size": True},
    "embed_layernorm": {"embed_norm_layer": nn.LayerNorm},
    "embed_other_norm": {"embed_norm_layer": _ScaleNorm},
}


def _vit(dtype=torch.float32, **kw):
    """A narrow ViT-S/16 (CPU time); test_vit_small_full_width runs the real width."""
    kw = {"img_size": 64, "depth": 2, "embed_dim": 96, "num_heads": 3, **kw}
    return timm.create_model("vit_small_patch16_224", num_classes=10, **kw).to(dtype).eval()


def _expected(model, x, keep, head=True):
    """timm's own embedding (original PatchEmbed + _pos_embed), then keep prefix + gathered patches,
    then timm's blocks (and ``head``): what the fused path must equal."""
    base_pe = type(model.patch_embed)._effssl_base if ek.is_sparse_vit(model) else type(model.patch_embed)
    t = base_pe.forward(model.patch_embed, x)
    if t.dim() == 4:  # dynamic_img_size: NHWC
        t = t.flatten(1, 2)
    n = x.shape[0]
    pre = [p.expand(n, -1, -1) for p in (model.cls_token, model.reg_token) if p is not None]
    pos = model.pos_embed
    if pos is None:
        full = torch.cat(pre + [t], 1)
    elif model.no_embed_class:
        full = torch.cat(pre + [t + pos], 1)
    else:
        full = torch.cat(pre + [t], 1) + pos
    return _kept_through_blocks(model, full, keep, head)


def _kept_through_blocks(model, full, keep, head):
    """The prefix + ``keep`` tokens of the embedded ``full`` [N, P + L, D], then timm's blocks and
    norm (and ``head``)."""
    n, npre = full.shape[0], model.num_prefix_tokens
    sel = torch.cat((torch.arange(npre).expand(n, -1), keep + npre), 1)
    tokens = full.gather(1, sel[..., None].expand(-1, -1, full.shape[-1]))
    features = model.norm(model.blocks(model.norm_pre(tokens)))
    return model.forward_head(features) if head else features


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_match_timm(variant, full_width=False):
    model = _vit(**VARIANTS[variant]) if not full_width else _vit(embed_dim=384, num_heads=6)
    x = torch.randn(3, 3, 64, 64)
    ref = model(x)
    keys = list(model.state_dict())
    params = [p for p in model.parameters()]
    ek.sparsify_vit(model)
    assert ek.is_sparse_vit(model)
    assert list(model.state_dict()) == keys and [p for p in model.parameters()] == params
    assert torch.equal(model(x), ref)  # nothing given: exactly the original
    g = torch.Generator().manual_seed(1)
    for keep in (
        ek.random_token_keep(3, 16, 0.5, multiple_of=1, generator=g),
        torch.tensor([[3, 3, 0], [15, 2, 7], [1, 1, 1]]),  # unsorted, duplicates
        torch.arange(16).expand(3, 16),  # K = L
        torch.tensor([[5], [0], [15]]),  # K = 1
    ):
        with ek.token_keep(keep):
            out, features = model(x), model.forward_features(x)
        torch.testing.assert_close(out, _expected(model, x, keep), rtol=1e-5, atol=1e-5)
        # the tokens too: a head (cls token or mean) cannot see them permuted or mispositioned
        torch.testing.assert_close(features, _expected(model, x, keep, head=False), rtol=1e-5, atol=1e-5)
        if keep.shape[1] == 16:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ek.unsparsify_vit(model)
    assert not ek.is_sparse_vit(model) and type(model) is type(_vit(depth=1))
    assert type(model.patch_embed).__name__ == "PatchEmbed"
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), ref)


def test_vit_small_full_width():
    """timm's vit_small_patch16_224 at its real width (384, 6 heads), 64 px, depth 2."""
    test_variants_match_timm("reg4", full_width=True)


def test_keep_uses_fused_op(monkeypatch):
    """The identity-norm path calls patch_embed_gather (the fused op), with the patch positions."""
    calls = []
    orig = vit_mod._patch_embed_gather

    def spy(images, weight, bias, keep, pos_embed, check_range):
        calls.append(None if pos_embed is None else tuple(pos_embed.shape))
        return orig(images, weight, bias, keep, pos_embed, check_range=check_range)

    monkeypatch.setattr(vit_mod, "_patch_embed_gather", spy)
    for kw, shape in (({}, (1, 16, 96)), ({"no_embed_class": True, "reg_tokens": 2}, (1, 16, 96))):
        model = ek.sparsify_vit(_vit(depth=1, **kw))
        with ek.token_keep(torch.tensor([[0, 5]])):
            model(torch.randn(1, 3, 64, 64))
        assert calls.pop() == shape


@pytest.mark.parametrize("variant", ["cls", "reg2_no_embed_class", "embed_layernorm", "embed_other_norm"])
def test_gradients_match_timm(variant):
    model = ek.sparsify_vit(_vit(**VARIANTS[variant], depth=1))
    x = torch.randn(2, 3, 64, 64)
    keep = torch.tensor([[1, 4, 4, 9, 15], [0, 2, 3, 8, 12]])
    with ek.token_keep(keep):
        model(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _expected(model, x, keep).square().sum().backward()
    for n, p in model.named_parameters():
        # float32 sums of ~100 terms of size ~50 (cls_token): the absolute error scales with
        # the gradient's largest entry, not with each entry (a near-zero one failed at 1e-5)
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5 + 1e-5 * scale, msg=n)
    for n in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"):
        assert got[n].abs().sum() > 0, n


def test_float64_gradcheck():
    """gradcheck of the embedding stage (fused gather + pos + prefix) w.r.t. every parameter."""
    model = ek.sparsify_vit(
        timm.create_model("vit_small_patch16_224", img_size=8, patch_size=4, in_chans=2, depth=1, embed_dim=4,
                          num_heads=2, num_classes=2, reg_tokens=1).double().eval()
    )
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    keep = torch.tensor([[3, 1, 1], [0, 2, 3]])
    names = ["patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token", "reg_token"]
    params = dict(model.named_parameters())

    def embed(*tensors):
        with ek.token_keep(keep):
            return _embed_with(model, dict(zip(names, tensors)), x)

    inputs = tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(embed, inputs)


def _embed_with(model, tensors, x):
    """patch_embed -> _pos_embed of the sparsified model with parameters replaced by ``tensors``."""

    class _Stage(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m._pos_embed(self.m.patch_embed(x))

    return torch.func.functional_call(_Stage(model), {"m." + k: v for k, v in tensors.items()}, (x,))


def test_cpu_autocast_bf16():
    model = ek.sparsify_vit(_vit(depth=1))
    x = torch.randn(2, 3, 64, 64)
    keep = torch.tensor([[0, 3, 5, 6], [1, 2, 9, 10]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with ek.token_keep(keep):
            out = model(x)
        exp = _expected(model, x, keep)
    assert out.dtype == exp.dtype
    torch.testing.assert_close(out.float(), exp.float(), rtol=2e-2, atol=2e-2)


def test_contextvar_scoping():
    """token_keep is per thread and nestable: online (inside) and momentum (outside) encoders."""
    online = ek.sparsify_vit(_vit(depth=1))
    momentum = copy.deepcopy(online)  # the usual way to make a momentum encoder; stays converted
    assert ek.is_sparse_vit(momentum)
    x = torch.randn(2, 3, 64, 64)
    full = momentum(x)
    keep = torch.tensor([[0, 1], [2, 3]])
    seen = {}
    with ek.token_keep(keep):
        assert online.forward_features(x).shape == (2, 3, 96)
        with ek.token_keep(None):
            assert torch.equal(momentum(x), full)
        def other_thread():
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # it says it means no keep: no DataParallel warning
                with ek.token_keep(None):
                    seen["out"] = momentum(x)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert online.forward_features(x).shape == (2, 3, 96)
    assert torch.equal(seen["out"], full)  # the other thread saw no keep
    assert online.forward_features(x).shape == (2, 17, 96)


def test_patch_drop_and_pos_drop_still_work():
    model = ek.sparsify_vit(_vit(depth=1, patch_drop_rate=0.5, pos_drop_rate=0.1, reg_tokens=2)).train()
    keep = ek.random_token_keep(2, 16, 0.5)  # K = 8
    with ek.token_keep(keep):
        feats = model.forward_features(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 3 + 4, 96)  # prefix 3, then timm's PatchDropout keeps int(8 * 0.5)


@pytest.mark.parametrize("mirrored", [False, True])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend, mirrored, monkeypatch):
    # mirrored: the keep read through nn/_state.py's mirror, as on torch < 2.14 (whose Dynamo
    # cannot trace ContextVar.get); here both ways run on the one torch of CI
    from effssl_kernels.nn import _state

    if not mirrored and torch.__version__ < "2.14":
        pytest.skip("this torch's Dynamo cannot trace ContextVar.get: the mirror is what it uses")
    monkeypatch.setattr(_state, "_MIRRORED", mirrored)
    torch._dynamo.reset()
    model = ek.sparsify_vit(_vit(depth=1, reg_tokens=1))
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    keeps = [torch.tensor([[0, 5, 7], [1, 2, 3]]), torch.tensor([[9, 5, 7], [15, 0, 3]])]
    for keep in keeps:  # a new keep of the same K reuses the graph; values are graph inputs
        with ek.token_keep(keep):
            out = compiled(x)
            ref = model(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)  # no keep: the full model
    if backend == "aot_eager":
        with ek.token_keep(keeps[0]):
            compiled(x).sum().backward()
        assert model.patch_embed.proj.weight.grad is not None


def test_compile_fullgraph_two_image_sizes_under_keep():
    # DINO multi-crop: a dynamic_img_size ViT compiled once, global then local views. The second
    # size makes the grid symbolic, and resizing the positional embedding to it raised
    # "Unsupported tp_repr_impl" under fullgraph until 2026-12-06 (as_pair's error path).
    torch._dynamo.reset()
    model = ek.sparsify_vit(_vit(depth=1, dynamic_img_size=True))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    keep = torch.tensor([[0, 3], [1, 2]])
    for px in (64, 32, 48):
        x = torch.randn(2, 3, px, px)
        with ek.token_keep(keep):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


class _KeepWrapper(nn.Module):
    """Export wrapper: the keep is an input and the `with` is inside forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, keep):
        with ek.token_keep(keep):
            return self.model(x)


def test_intermediates_on_the_patch_grid_refused_under_keep_or_patch_size():
    # timm reshapes the tokens onto the model's own grid: under a keep (K of 16 tokens) or another
    # patch size, get_intermediate_layers(reshape=True) gave [N, K*D/16, 4, 4] garbage silently.
    orig = _vit(depth=1)
    model = ek.sparsify_vit(copy.deepcopy(orig))
    x = torch.randn(2, 3, 64, 64)
    keep = ek.random_token_keep(2, 16, 0.5, multiple_of=1)
    with torch.no_grad():
        for a, b in zip(model.get_intermediate_layers(x, n=1, reshape=True),
                        orig.get_intermediate_layers(x, n=1, reshape=True)):
            assert torch.equal(a, b)  # no setting in force: timm's own
        with ek.token_keep(keep):
            for call in (lambda: model.forward_intermediates(x),
                         lambda: model.forward_intermediates(x, None, False, False, False, "NCHW"),
                         lambda: model.get_intermediate_layers(x, n=1, reshape=True)):
                with pytest.raises(ValueError, match="output_fmt='NLC'"):
                    call()
            nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)[0]
            assert nlc.shape == (2, 8, 96)
            torch.testing.assert_close(nlc, model.get_intermediate_layers(x, n=1)[0])
        with ek.patch_size(model, 8):
            with pytest.raises(ValueError, match="patch_size"):
                model.get_intermediate_layers(x, n=1, reshape=True)
            assert model.get_intermediate_layers(x, n=1)[0].shape == (2, 64, 96)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_torchscript_refused_with_a_clear_error():
    # jit.trace under a keep recorded it as constants of the trace, applied to every input
    model = ek.sparsify_vit(_vit(depth=1))
    x = torch.randn(2, 3, 64, 64)
    with ek.token_keep(ek.random_token_keep(2, 16, 0.5, multiple_of=1)):
        with pytest.raises(RuntimeError, match="torch.jit.trace"):
            torch.jit.trace(model, x)
    with pytest.raises(TypeError, match=r"unsparsify_vit\(model\)"):  # the ViT's undo, not ResNets'
        torch.jit.script(model)
    with pytest.raises(TypeError, match="ek.unsparsify_vit"):
        ek.unsparsify(nn.Sequential(model))
    with torch.no_grad():
        assert torch.equal(torch.jit.trace(model, x)(x), model(x))


def test_export_records_no_keep_entered_outside_it():
    # Exported inside a token_keep entered outside, the keep became a constant of the program,
    # applied to every later call whatever keep was in force: it raises now. A wrapper taking the
    # keep as an input exports, and with a dynamic K serves any K.
    from torch.export import Dim

    model = ek.sparsify_vit(_vit(depth=1))
    x = torch.randn(2, 3, 64, 64)
    k1, k2 = ek.random_token_keep(2, 16, 0.5, multiple_of=1), ek.random_token_keep(2, 16, 0.25, multiple_of=1)
    with ek.token_keep(k1):
        with pytest.raises(RuntimeError, match="torch.export of a model called inside a token_keep"):
            torch.export.export(model, (x,), strict=False)
        if EXPORT_STRICT_BY_DEFAULT and not _state._DYNAMO_KNOWS_EXPORT:
            # torch < 2.8 exports strictly by default; Dynamo refuses the keep's free tensor
            with pytest.raises(Exception, match=TORCH_REFUSES_FREE_TENSORS):
                torch.export.export(model, (x,))
        if _state._DYNAMO_KNOWS_EXPORT:  # strict export (a Dynamo trace) skipped the guard
            with pytest.raises(Exception, match="torch.export of a model called inside a token_keep"):
                torch.export.export(model, (x,), strict=True)
    ep = torch.export.export(_KeepWrapper(model), (x, k1), dynamic_shapes=({}, {1: Dim("K", min=1, max=16)}),
                             strict=False)
    for keep in (k2, k1):
        with ek.token_keep(keep):
            want = model(x)
        torch.testing.assert_close(ep.module()(x, keep), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make_keep,exc,match",
    [
        (lambda: torch.tensor([[0, 16], [1, 2]]), ValueError, "0, 16"),
        (lambda: torch.tensor([[0, -1], [1, 2]]), ValueError, "0, 16"),
        (lambda: torch.tensor([[0, 1], [1, 2], [3, 4]]), ValueError, "rows"),
        (lambda: torch.tensor([[0, 1]]), ValueError, "rows"),
    ],
)
def test_bad_keep_in_forward(make_keep, exc, match):
    model = ek.sparsify_vit(_vit(depth=1))
    with ek.token_keep(make_keep()):
        with pytest.raises(exc, match=match):
            model(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize(
    "keep,exc",
    [
        (torch.zeros(2, 0, dtype=torch.long), ValueError),
        (torch.zeros(2, 3), TypeError),
        (torch.zeros(6, dtype=torch.long), ValueError),
        ([[0, 1]], TypeError),
    ],
)
def test_bad_keep_at_entry(keep, exc):
    with pytest.raises(exc):
        with ek.token_keep(keep):
            pass


def test_bad_images_and_models():
    model = ek.sparsify_vit(_vit(depth=1))
    with ek.token_keep(torch.tensor([[0]])):
        with pytest.raises(ValueError, match="does not match"):
            model(torch.randn(1, 3, 48, 48))
    dyn = ek.sparsify_vit(_vit(depth=1, dynamic_img_size=True))
    with ek.token_keep(torch.tensor([[0]])):
        for h, w in ((60, 64), (64, 60)):  # either side
            with pytest.raises(ValueError, match=f"must divide the input size {h}x{w}"):
                dyn(torch.randn(1, 3, h, w))
    with pytest.raises(TypeError):
        ek.sparsify_vit(nn.Linear(2, 2))
    # a projection that is not a plain patchify: the kept patches' GEMM would compute another map
    for attr, value in (("padding", (1, 1)), ("dilation", (2, 2)), ("stride", (8, 8)), ("padding_mode", "reflect")):
        odd = _vit(depth=1)
        setattr(odd.patch_embed.proj, attr, value)
        with pytest.raises(TypeError, match="kernel == stride, no padding"):
            ek.sparsify_vit(odd)
    grouped = _vit(depth=1)  # 96 = 3 groups of 32 outputs, each from one input channel
    grouped.patch_embed.proj = nn.Conv2d(3, 96, 16, 16, groups=3)
    with pytest.raises(TypeError, match="groups 1"):
        ek.sparsify_vit(grouped)
    with pytest.raises(TypeError):
        ek.unsparsify_vit(_vit(depth=1))
    assert ek.sparsify_vit(model) is model  # idempotent


def _timm_reference(ref, x, keep, head=True):
    """The untouched timm model ``ref``: its own PatchEmbed and its class's ``_pos_embed`` on all
    patches, then the prefix + ``keep`` tokens gathered, then its blocks and (``head``) head."""
    return _kept_through_blocks(ref, ref._pos_embed(ref.patch_embed(x)), keep, head)


def _check_vs_timm(model, ref, x, L, tol=1e-5):
    """No keep, all patches kept, and two partial keeps (duplicates, K = 1) against ``ref``."""
    torch.testing.assert_close(model(x), ref(x), rtol=tol, atol=tol)
    n = x.shape[0]
    g = torch.Generator().manual_seed(L)
    for keep in (torch.arange(L).expand(n, L), torch.randint(0, L, (n, max(1, L // 2)), generator=g),
                 torch.randint(0, L, (n, 1), generator=g)):
        with ek.token_keep(keep):
            out, features = model(x), model.forward_features(x)
        want = ref(x) if keep.shape[1] == L and torch.equal(keep[0], torch.arange(L)) else _timm_reference(ref, x, keep)
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
        torch.testing.assert_close(features, _timm_reference(ref, x, keep, head=False), rtol=tol, atol=tol)


@pytest.mark.parametrize("kw", [{}, {"dynamic_img_size": True}, {"embed_norm_layer": nn.LayerNorm}])
def test_deit_distilled_matches_timm(kw):
    """VisionTransformerDistilled's prefix is cls + dist (num_prefix_tokens = 2): the sparse path
    must build it as timm's own _pos_embed of that class does."""
    ref = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16,
                            num_heads=2, num_classes=5, **kw).eval()
    ref.dist_token.data.normal_()  # timm initialises it near cls_token; make them clearly different
    model = ek.sparsify_vit(copy.deepcopy(ref))
    assert model.num_prefix_tokens == 2 and model.dist_token is not None
    x = torch.randn(2, 3, 32, 32)
    _check_vs_timm(model, ref, x, 16)
    if kw.get("dynamic_img_size"):  # another resolution: pos_embed resampled with both prefix entries kept
        _check_vs_timm(model, ref, torch.randn(2, 3, 48, 40), 30)
    # the patch-size path builds the same prefix
    ref12 = copy.deepcopy(ref)
    ref12.set_input_size(patch_size=16)
    with ek.patch_size(model, 16, interpolation="bicubic", antialias=True):
        _check_vs_timm(model, ref12, x, 4, tol=1e-4)


def test_prefix_must_match_num_prefix_tokens():
    """A model whose prefix tokens do not add up to num_prefix_tokens is refused (at conversion
    and, if changed later, at forward) instead of broadcasting a wrong prefix; so is a subclass
    with its own _pos_embed, whose prefix the converter cannot know."""
    from timm.models.vision_transformer import VisionTransformer

    bad = _vit(depth=1, reg_tokens=2)
    bad.num_prefix_tokens = 2  # 1 cls + 2 registers = 3
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        ek.sparsify_vit(bad)
    assert not ek.is_sparse_vit(bad)
    distilled_reg = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1,
                                      embed_dim=16, num_heads=2, reg_tokens=2)
    with pytest.raises(ValueError, match="num_prefix_tokens"):  # timm's own _pos_embed ignores them
        ek.sparsify_vit(distilled_reg)
    model = ek.sparsify_vit(_vit(depth=1, reg_tokens=2))
    model.reg_token = None
    with ek.token_keep(torch.tensor([[0, 1]])):
        with pytest.raises(ValueError, match="num_prefix_tokens"):
            model(torch.randn(1, 3, 64, 64))

    class OwnPrefix(VisionTransformer):
        def _pos_embed(self, x):
            return super()._pos_embed(x)

    own = OwnPrefix(img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2, num_classes=0)
    with pytest.raises(TypeError, match="_pos_embed"):
        ek.sparsify_vit(own)


@pytest.mark.parametrize("norm", [_ScaleNorm, "simplenorm", nn.LayerNorm, None])
def test_float64_token_keep(norm):
    """float64 runs every embedding path (fused, token-wise norm, embed-all-then-gather)."""
    kw = {} if norm is None else {"embed_norm_layer": norm}
    ref = timm.create_model("vit_small_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=8, num_heads=2,
                            num_classes=3, reg_tokens=1, **kw).double().eval()
    model = ek.sparsify_vit(copy.deepcopy(ref))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    keep = torch.tensor([[0, 3, 3, 15], [1, 2, 9, 4]])
    with ek.token_keep(keep):
        out = model(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _timm_reference(ref, x, keep), rtol=1e-12, atol=1e-12)


def test_float64_gradcheck_unfused_norm():
    """gradcheck through the embed-all-then-gather path (a norm not known to act per token)."""
    model = ek.sparsify_vit(
        timm.create_model("vit_small_patch16_224", img_size=8, patch_size=4, in_chans=2, depth=1, embed_dim=4,
                          num_heads=2, num_classes=2, embed_norm_layer=_ScaleNorm).double().eval()
    )
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    keep = torch.tensor([[3, 1, 1], [0, 2, 3]])
    names = ["patch_embed.proj.weight", "patch_embed.norm.weight", "pos_embed", "cls_token"]
    params = dict(model.named_parameters())

    def embed(*tensors):
        with ek.token_keep(keep):
            return _embed_with(model, dict(zip(names, tensors)), x)

    assert torch.autograd.gradcheck(embed, tuple(params[n].detach().clone().requires_grad_() for n in names))


def test_non_square_patches_match_timm():
    """A model with (ph, pw) patches, and patch_size((ph, pw)), under token_keep: embed all, then
    gather (patch_embed_gather takes square patches), equal to timm."""
    ref = timm.create_model("vit_small_patch16_224", img_size=(16, 32), patch_size=(4, 8), depth=1, embed_dim=16,
                            num_heads=2, num_classes=3, reg_tokens=1).eval()
    model = ek.sparsify_vit(copy.deepcopy(ref))
    _check_vs_timm(model, ref, torch.randn(2, 3, 16, 32), 16)

    ref = timm.create_model("vit_small_patch16_224", img_size=48, patch_size=8, depth=1, embed_dim=16, num_heads=2,
                            num_classes=3, no_embed_class=True, reg_tokens=2).eval()
    model = ek.sparsify_vit(copy.deepcopy(ref))
    ref.set_input_size(patch_size=(12, 16))  # timm's own patch resize (bicubic, antialias) and pos resample
    with ek.patch_size(model, (12, 16), interpolation="bicubic", antialias=True):
        _check_vs_timm(model, ref, torch.rand(2, 3, 48, 48), 12, tol=1e-4)


@pytest.mark.parametrize("variant", ["cls", "no_embed_class", "reg4", "reg2_no_embed_class", "no_class_token_reg",
                                     "embed_layernorm", "embed_other_norm"])
def test_dynamic_img_size_other_resolution_matches_timm(variant):
    """dynamic_img_size at sizes other than img_size: the positional embedding is resampled from
    the stored grid, as timm's _pos_embed does."""
    ref = _vit(depth=1, dynamic_img_size=True, **VARIANTS[variant])
    model = ek.sparsify_vit(copy.deepcopy(ref))
    for h, w in ((48, 80), (96, 64)):
        _check_vs_timm(model, ref, torch.randn(2, 3, h, w), (h // 16) * (w // 16))


def test_dynamic_img_pad_matches_timm():
    ref = _vit(depth=1, dynamic_img_size=True, dynamic_img_pad=True, reg_tokens=1)
    model = ek.sparsify_vit(copy.deepcopy(ref))
    _check_vs_timm(model, ref, torch.randn(2, 3, 60, 50), 16)  # padded to 64 x 64: a 4 x 4 grid
    _check_vs_timm(model, ref, torch.randn(2, 3, 64, 48), 12)  # sizes the patch divides: no padding


def test_no_pos_embed_skips_pos_drop_as_timm_in_training():
    """timm's _pos_embed returns before pos_drop when the model has no positional embedding: in
    training, with pos_drop_rate 0.5, the kept tokens reach the blocks undropped."""
    ref = _vit(depth=1, pos_embed="none", pos_drop_rate=0.5).train()
    model = ek.sparsify_vit(copy.deepcopy(ref)).train()
    x, keep = torch.randn(2, 3, 64, 64), torch.tensor([[0, 5, 9], [3, 3, 15]])
    with ek.token_keep(keep):
        got = model.forward_features(x)
    torch.testing.assert_close(got, _timm_reference(ref, x, keep, head=False), rtol=1e-5, atol=1e-5)


def test_patch_size_not_dividing_a_padded_model():
    """dynamic_img_pad pads the image to whole patches, so a patch size that does not divide the
    model's image size is accepted: 48 px at patch 10 is padded to 50, a 5 x 5 grid (timm's own
    set_input_size keeps a 4 x 4 grid and then fails on the padded image)."""
    model = ek.sparsify_vit(timm.create_model("vit_small_patch16_224", img_size=48, patch_size=8, depth=1,
                                              embed_dim=16, num_heads=2, num_classes=3,
                                              dynamic_img_pad=True).eval())
    x = torch.rand(2, 3, 48, 48)
    with ek.patch_size(model, 10):
        y = model.forward_features(x)
        with ek.token_keep(torch.arange(25).expand(2, 25)):  # the gather path, every token
            gathered = model.forward_features(x)
    assert y.shape == (2, 1 + 25, 16)
    torch.testing.assert_close(gathered, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [{"no_embed_class": True}, {"reg_tokens": 2}, {"no_embed_class": True, "reg_tokens": 2},
                                {"class_token": False, "global_pool": "avg", "no_embed_class": True}])
def test_patch_size_layouts_match_timm(kw):
    """patch_size with no_embed_class and register tokens against timm's own set_input_size."""
    ref = timm.create_model("vit_small_patch16_224", img_size=48, patch_size=8, depth=1, embed_dim=16, num_heads=2,
                            num_classes=3, **kw).eval()
    model = ek.sparsify_vit(copy.deepcopy(ref))
    x = torch.rand(2, 3, 48, 48)
    for p in (12, 6):
        resized = copy.deepcopy(ref)
        resized.set_input_size(patch_size=p)
        with ek.patch_size(model, p, interpolation="bicubic", antialias=True):
            _check_vs_timm(model, resized, x, (48 // p) ** 2, tol=1e-4)


def test_tokenwise_timm_norms_are_fused(monkeypatch):
    """timm's token-wise norms embed only the kept patches; a norm not known to act per token
    (and channels-first LayerNorm2d, a LayerNorm subclass) embeds all, then gathers."""
    from timm.layers import LayerNorm2d

    calls = []
    orig = vit_mod._gather_tokens
    monkeypatch.setattr(vit_mod, "_gather_tokens", lambda *a, **k: calls.append(1) or orig(*a, **k))
    for norm in ("simplenorm", "rmsnormfp32", "layernormfp32", "rmsnorm", "layernorm"):
        ref = _vit(depth=1, embed_norm_layer=norm)
        model = ek.sparsify_vit(copy.deepcopy(ref))
        calls.clear()
        keep = torch.tensor([[0, 3, 7], [2, 2, 15]])
        x = torch.randn(2, 3, 64, 64)
        with ek.token_keep(keep):
            out = model(x)
        assert not calls, norm
        torch.testing.assert_close(out, _timm_reference(ref, x, keep), rtol=1e-5, atol=1e-5)
    assert isinstance(LayerNorm2d(96), vit_mod._TOKENWISE_NORMS)
    assert isinstance(LayerNorm2d(96), vit_mod._NOT_TOKENWISE_NORMS)


def test_keep_range_checked_once_or_not_at_all(monkeypatch):
    """check=True: one range check per forward (token_keep's, not the ops' again); check=False:
    none, and on CPU a bad index still raises from the kernel that reads it."""
    import importlib

    gt_mod = importlib.import_module("effssl_kernels.ops.gather_tokens")  # the package attribute is the function
    peg_mod = importlib.import_module("effssl_kernels.ops.patch_embed_gather")

    calls = []
    orig = vit_mod.check_keep_range

    def spy(keep, L, op):
        calls.append(op)
        return orig(keep, L, op)

    for mod in (vit_mod, gt_mod, peg_mod):
        monkeypatch.setattr(mod, "check_keep_range", spy)
    x = torch.randn(1, 3, 64, 64)
    keep = torch.tensor([[0, 5]])
    for kw in ({}, {"embed_norm_layer": _ScaleNorm}, {"embed_norm_layer": nn.LayerNorm}):
        model = ek.sparsify_vit(_vit(depth=1, **kw))
        calls.clear()
        with ek.token_keep(keep):
            want = model(x)
        assert calls == ["token_keep"], kw
        calls.clear()
        with ek.token_keep(keep, check=False):
            assert torch.equal(model(x), want)
        assert calls == [], kw
        with ek.token_keep(torch.tensor([[0, 99]]), check=False):
            with pytest.raises((ValueError, RuntimeError, IndexError), match="99|outside|out of"):
                model(x)
        with ek.token_keep(torch.tensor([[0, 99]])):
            with pytest.raises(ValueError, match="token_keep: keep holds 99"):
                model(x)


def test_patch_size_rejects_bools():
    model = ek.sparsify_vit(_vit(depth=1))
    for bad in ((True, True), True, (16, False)):
        with pytest.raises(TypeError, match="patch_size: size must be an int or a pair of ints"):
            with ek.patch_size(model, bad):
                pass


def test_patch_size_must_divide_a_fixed_image_size_on_both_axes():
    model = ek.sparsify_vit(timm.create_model("vit_small_patch16_224", img_size=240, num_classes=0, depth=1))
    for bad in ((24, 36), (36, 24), 36):  # 240 = 10 x 24, not a multiple of 36
        with pytest.raises(ValueError, match="does not divide the model's image size"):
            with ek.patch_size(model, bad):
                pass
    with ek.patch_size(model, (24, 40)):
        assert model(torch.randn(1, 3, 240, 240)).shape == (1, 384)


def test_masked_checkpoint_recomputes_under_the_forward_keep():
    """Whole-model checkpointing with backward outside the ``with``: ek.masked_checkpoint
    recomputes with the tokens kept at forward (torch's own checkpoint would recompute with every
    token and fail on the saved shapes)."""
    torch.manual_seed(0)
    a = ek.sparsify_vit(_vit(torch.float64))
    b = copy.deepcopy(a)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    keep = torch.tensor([[0, 3, 5, 9, 10, 12, 14, 15], [1, 2, 3, 4, 6, 7, 8, 11]])
    with ek.token_keep(keep):
        ya = a(x)
        yb = ek.masked_checkpoint(b, x)
    torch.testing.assert_close(yb, ya)
    assert not torch.allclose(ya, a(x))  # the keep changes the output
    ya.square().sum().backward()
    yb.square().sum().backward()  # outside the with
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=lambda m, k=k: f"{k}: {m}")
    with ek.token_keep(keep):
        yc = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False)
    with pytest.raises(RuntimeError):
        yc.sum().backward()  # the plain checkpoint recomputes with all 16 tokens


@pytest.mark.parametrize("how", ["masked_checkpoint", "plain_inside"])
def test_keep_refilled_before_backward_does_not_reach_the_recomputation(how):
    # A loop that refills one keep buffer for the next view before backward: the checkpoint
    # recomputed with the new values (neither keep's gradients, silently) until token_keep took
    # a copy (2026-12-06).
    torch.manual_seed(0)
    vit = ek.sparsify_vit(_vit(torch.float64, depth=1))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    k1 = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])

    def grads(run):
        vit.zero_grad()
        run()
        return [p.grad.clone() for p in vit.parameters() if p.grad is not None]

    def plain():
        with ek.token_keep(k1):
            vit(x).square().sum().backward()

    def refilled():
        keep = k1.clone()
        with ek.token_keep(keep):
            if how == "masked_checkpoint":
                y = ek.masked_checkpoint(vit, x)
            else:
                y = torch.utils.checkpoint.checkpoint(vit, x, use_reentrant=False)
            keep.copy_(k1 + 8)
            if how == "plain_inside":
                y.square().sum().backward()
        if how == "masked_checkpoint":
            y.square().sum().backward()

    for a, b in zip(grads(refilled), grads(plain)):
        torch.testing.assert_close(a, b)


def test_masked_checkpoint_of_a_full_call_then_a_kept_call():
    # a dense masked_checkpoint then a token_keep call of the same ViT: not refused, same grads
    vit = ek.sparsify_vit(_vit(torch.float64, depth=1))
    x1, x2 = torch.rand(2, 3, 64, 64, dtype=torch.float64), torch.rand(2, 3, 64, 64, dtype=torch.float64)
    keep = ek.random_token_keep(2, 16, 0.5, multiple_of=1, generator=torch.Generator().manual_seed(0))

    def step(ckpt):
        vit.zero_grad()
        a = ek.masked_checkpoint(vit, x1) if ckpt else vit(x1)
        with ek.token_keep(keep):
            b = vit(x2)
        (a.square().sum() + b.square().sum()).backward()
        return [p.grad.clone() for p in vit.parameters() if p.grad is not None]

    for g, want in zip(step(True), step(False)):
        torch.testing.assert_close(g, want)


@pytest.mark.parametrize("reentrant", [False, True])
def test_masked_checkpoint_recomputes_at_the_forward_patch_size(reentrant):
    # ek.patch_size lives on the model, not in the context: masked_checkpoint carries it too (a
    # reentrant recomputation at the native patch gave wrong gradients silently)
    torch.manual_seed(0)
    a = ek.sparsify_vit(_vit(torch.float64))
    b = copy.deepcopy(a)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([[0, 3, 5, 9], [1, 2, 6, 8]])  # of the 4x4 = 16 tokens at patch 16
    with ek.patch_size(a, 32), ek.patch_size(b, 32):
        ya = a(x)
        yb = ek.masked_checkpoint(b, x, use_reentrant=reentrant)
    torch.testing.assert_close(yb, ya)
    ya.square().sum().backward()
    yb.square().sum().backward()  # outside the with: recomputed at patch 32
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=lambda m, k=k: f"{k}: {m}")
    assert b.patch_embed._effssl_patch is None  # the recomputation put the setting back
    with ek.token_keep(keep):  # with keep too, and a patch size in force at backward is undone
        ya, yb = a(x), ek.masked_checkpoint(b, x)
    with ek.patch_size(b, 32):
        yb.square().sum().backward()
    assert b.patch_embed._effssl_patch is None


@pytest.mark.parametrize("reentrant", [False, True])
def test_plain_checkpoint_recomputed_without_the_keep_is_refused(reentrant):
    # use_reentrant=True recomputed with every token: silently all-token gradients before
    b = ek.sparsify_vit(_vit(torch.float64))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    with ek.token_keep(torch.tensor([[0, 3, 5, 9], [1, 2, 6, 8]])):
        y = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match="masked_checkpoint"):
        y.sum().backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_plain_checkpoint_recomputed_at_another_patch_size_is_refused(reentrant):
    # forward at patch 32, backward inside patch_size 8 (keep or none): a recomputation at
    # another patch size would give that size's gradients, silently
    from effssl_kernels.sparse.packed import _UNKNOWN, _saved_tensors_hooks

    if not reentrant and _saved_tensors_hooks() is _UNKNOWN:
        pytest.skip("torch <= 2.7 cannot name a non-reentrant checkpoint's hooks")
    b = ek.sparsify_vit(_vit(torch.float64))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    for keep in (None, torch.tensor([[0, 1], [2, 3]])):
        with ek.token_keep(keep), ek.patch_size(b, 32):
            y = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=reentrant)
        with ek.token_keep(keep), ek.patch_size(b, 8):
            with pytest.raises(RuntimeError, match="under a different token_keep or patch_size"):
                y.sum().backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_plain_checkpoint_recomputed_under_another_keep_is_refused(reentrant):
    # Backward inside the second view's token_keep (same K, so checkpoint's shape check passes)
    # recomputed the first view on the second view's tokens: wrong gradients, silently.
    b = ek.sparsify_vit(_vit(torch.float64))
    x1 = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    k1, k2 = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), torch.tensor([[8, 9, 10, 11], [12, 13, 14, 15]])
    # torch <= 2.7 cannot name a non-reentrant checkpoint's hooks: there every grad-mode forward
    # is noted, and the module's last one decides (the second view's keep)
    from effssl_kernels.sparse.packed import _UNKNOWN, _saved_tensors_hooks

    if reentrant or _saved_tensors_hooks() is not _UNKNOWN:
        with ek.token_keep(k1):
            z1 = torch.utils.checkpoint.checkpoint(b, x1, use_reentrant=reentrant)
        with ek.token_keep(k2):
            z2 = b(x2)
            with pytest.raises(RuntimeError, match="under a different token_keep or patch_size"):
                (z1 * z2).sum().backward()
        # both views checkpointed: each recomputation is compared with its own forward (a note
        # per module let the first view's recompute match the second view's keep)
        with ek.token_keep(k1):
            z1 = torch.utils.checkpoint.checkpoint(b, x1, use_reentrant=reentrant)
        with ek.token_keep(k2):
            z2 = torch.utils.checkpoint.checkpoint(b, x2, use_reentrant=reentrant)
            with pytest.raises(RuntimeError, match="under a different token_keep or patch_size"):
                (z1 * z2).sum().backward()
    # masked_checkpoint recomputes under the forward's own keep
    with ek.token_keep(k1):
        z1 = ek.masked_checkpoint(b, x1, use_reentrant=reentrant)
    with ek.token_keep(k2):
        z2 = b(x2)
        (z1 * z2).sum().backward()
    assert x1.grad is not None


def test_timm_block_checkpointing_with_keep():
    """timm's own (per-block) gradient checkpointing recomputes blocks on the kept tokens."""
    torch.manual_seed(0)
    a = ek.sparsify_vit(_vit(torch.float64))
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    a.train(), b.train()  # timm checkpoints only in training (no dropout in _vit)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    keep = torch.tensor([[0, 3, 5, 9, 10, 12, 14, 15], [1, 2, 3, 4, 6, 7, 8, 11]])
    with ek.token_keep(keep):
        ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("reparam", ["weight_norm", "spectral_norm", "prune", "forward_hook"])
def test_hooks_on_the_patch_projection_run(reparam):
    """Old-style weight_norm, spectral_norm and prune recompute proj.weight in a forward
    pre-hook: the sparse path read the weight without calling proj, so it used a stale one
    (0.1 off after an optimizer step, silently) and feature hooks never ran. A hooked
    projection is now called on every patch, as in timm, and the kept tokens gathered."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = ek.sparsify_vit(_vit())
    proj = model.patch_embed.proj
    seen = []
    if reparam == "weight_norm":
        torch.nn.utils.weight_norm(proj)
        p = proj.weight_g
    elif reparam == "spectral_norm":
        torch.nn.utils.spectral_norm(proj)
        p = proj.weight_orig
    elif reparam == "prune":
        prune.l1_unstructured(proj, "weight", 0.3)
        p = proj.weight_orig
    else:
        proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        p = proj.weight
    with torch.no_grad():
        p.mul_(0.5)  # an optimizer step on the reparametrization's parameter
    x = torch.randn(2, 3, 64, 64)
    keep = torch.tensor([[0, 3, 5, 9, 12, 15], [1, 2, 4, 8, 10, 14]])
    with torch.no_grad():
        with ek.token_keep(keep):
            got = model(x)
        hooked = list(seen)  # what the sparse forward's projection hook saw
        want = _expected(model, x, keep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if reparam == "forward_hook":
        assert hooked == [(2, 96, 4, 4)]


class _ScaledConv(nn.Conv2d):
    """A projection with its own forward (as torch.ao's QAT Conv2d fake-quantises its weight)."""

    def forward(self, x):
        return super().forward(x) * 3.0


def test_patch_embeds_with_their_own_forward_are_not_bypassed():
    # The fused path called F.conv2d on proj.weight (or embedded itself), skipping a subclass's
    # forward: keep-all differed from the dense model silently.
    from timm.layers import PatchEmbed

    class Scaled(PatchEmbed):
        def forward(self, x):
            return super().forward(x * 2.0)

    with pytest.raises(TypeError, match="overrides PatchEmbed.forward"):
        ek.sparsify_vit(_vit(embed_layer=Scaled))
    torch.manual_seed(0)
    model = _vit()
    old = model.patch_embed.proj
    model.patch_embed.proj = _ScaledConv(3, 96, 16, 16)
    model.patch_embed.proj.load_state_dict(old.state_dict())
    model = ek.sparsify_vit(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = model(x)
        with ek.token_keep(torch.arange(16).expand(2, 16)):
            torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-5)
        keep = torch.tensor([[0, 3, 5, 9], [1, 2, 4, 8]])
        with ek.token_keep(keep):
            torch.testing.assert_close(model(x), _expected(model, x, keep), rtol=1e-5, atol=1e-5)
        with pytest.raises(TypeError, match="cannot run the forward of _ScaledConv"):
            with ek.patch_size(model, 32):
                model(x)


def test_patch_size_honours_or_refuses_projection_hooks():
    # Under patch_size the pre-hooks ran but their returned input was dropped, and forward hooks
    # were skipped: at the model's own patch size the output was not the model's.
    torch.manual_seed(0)
    model = ek.sparsify_vit(_vit())
    x = torch.randn(2, 3, 64, 64)
    h = model.patch_embed.proj.register_forward_pre_hook(lambda m, i: (i[0] * 0.5,))
    with torch.no_grad():
        dense = model(x)
        with ek.patch_size(model, 16):
            torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-5)
    h.remove()
    model.patch_embed.proj.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(TypeError, match="forward hooks on the projection"):
        with ek.patch_size(model, 16):
            model(x)


@pytest.mark.parametrize("norm", [None, nn.LayerNorm, _ScaleNorm])
def test_forward_features_tokens_in_keeps_order(norm):
    """The kept tokens come out in keep's order (unsorted, duplicates), each with its own position,
    on every embedding path: the head (cls token or mean) cannot see a permutation, the tokens can."""
    kw = {} if norm is None else {"embed_norm_layer": norm}
    ref = _vit(depth=1, reg_tokens=1, **kw)
    model = ek.sparsify_vit(copy.deepcopy(ref))
    x, keep = torch.randn(2, 3, 64, 64), torch.tensor([[9, 3, 3, 0], [15, 2, 7, 1]])
    with ek.token_keep(keep):
        got = model.forward_features(x)
    torch.testing.assert_close(got, _timm_reference(ref, x, keep, head=False), rtol=1e-5, atol=1e-5)


def test_patch_size_with_an_embed_norm_matches_timms_tokens():
    """patch_size without and with token_keep on a model with a patch-embed norm: the tokens (not
    only the head, which at timm's init barely sees the patch tokens) equal timm's set_input_size."""
    ref = timm.create_model("vit_small_patch16_224", img_size=48, patch_size=8, depth=1, embed_dim=16, num_heads=2,
                            num_classes=3, embed_norm_layer=nn.LayerNorm).eval()
    model = ek.sparsify_vit(copy.deepcopy(ref))
    resized = copy.deepcopy(ref)
    resized.set_input_size(patch_size=12)
    x, keep = torch.rand(2, 3, 48, 48), torch.tensor([[3, 0, 15, 7], [1, 1, 9, 4]])
    with ek.patch_size(model, 12, interpolation="bicubic", antialias=True):
        torch.testing.assert_close(model.forward_features(x), resized.forward_features(x), rtol=1e-4, atol=1e-4)
        with ek.token_keep(keep):
            got = model.forward_features(x)
    torch.testing.assert_close(got, _timm_reference(resized, x, keep, head=False), rtol=1e-4, atol=1e-4)


def test_pos_drop_applies_to_the_kept_tokens():
    """pos_drop runs after the kept tokens get their positions, as in timm (Dropout(1.0) in training:
    deterministic, every token zeroed, so the sparse and timm paths can be compared)."""
    x, keep = torch.randn(2, 3, 64, 64), torch.tensor([[0, 5, 9], [3, 3, 15]])
    for kw in ({}, {"embed_norm_layer": nn.LayerNorm}):
        ref = _vit(depth=1, reg_tokens=1, pos_drop_rate=1.0, **kw).train()
        model = ek.sparsify_vit(copy.deepcopy(ref)).train()
        with ek.token_keep(keep):
            got = model.forward_features(x)
        torch.testing.assert_close(got, _timm_reference(ref, x, keep, head=False), rtol=1e-5, atol=1e-5)

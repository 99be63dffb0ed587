"""nn/_state.py: the ContextVar that carries the block mask and the kept tokens, and the mirror
that compiled code reads on torch < 2.14 (whose Dynamo cannot trace ContextVar.get)."""
import contextvars

import pytest
import torch

from effssl_kernels.nn import _state


def test_bound_nests_and_restores_both():
    s = _state.ContextState("t_nest")
    a, b = object(), object()
    with s.bound(a):
        assert s.get() is a and s.mirror is a
        with s.bound(b):
            assert s.get() is b and s.mirror is b
        assert s.get() is a and s.mirror is a
    assert s.get() is None and s.mirror is None
    with pytest.raises(RuntimeError), s.bound(a):
        raise RuntimeError
    assert s.get() is None and s.mirror is None


def test_mirror_restored_when_reset_fails():
    # entered in one Context, left in another: ContextVar.reset raises; the mirror must not stay set
    s = _state.ContextState("t_foreign")
    cm = s.bound(torch.ones(1))
    contextvars.copy_context().run(cm.__enter__)
    with pytest.raises(ValueError):
        cm.__exit__(None, None, None)
    assert s.mirror is None


def test_run_in_sets_the_mirrors_from_the_snapshot():
    s = _state.ContextState("t_snap")
    with s.bound("forward"):
        snap = contextvars.copy_context()
    seen = _state.run_in(snap, lambda: (s.get(), s.mirror))
    assert seen == ("forward", "forward") and s.mirror is None


def _compiled_get(mirrored: bool, monkeypatch, name: str):
    """A ContextState and ``x + state.get()`` compiled (fullgraph), read through the mirror or not."""
    if not mirrored and _state.torch.__version__ < "2.14":
        pytest.skip("this torch's Dynamo cannot trace ContextVar.get: the mirror is what it uses")
    monkeypatch.setattr(_state, "_MIRRORED", mirrored)
    s = _state.ContextState(name)
    torch._dynamo.reset()
    return s, torch.compile(lambda x: x + s.get(), backend="eager", fullgraph=True)


@pytest.mark.parametrize("mirrored", [False, True])
def test_compiled_code_reads_the_mirror_only_when_mirrored(mirrored, monkeypatch):
    s, f = _compiled_get(mirrored, monkeypatch, "t_compile")
    x = torch.zeros(2)
    with s.bound(torch.ones(2)):
        s.mirror = torch.full((2,), 5.0)  # what only the mirror holds
        out = f(x)
    assert torch.equal(out, torch.full((2,), 5.0 if mirrored else 1.0))
    assert s.get() is None and s.mirror is None


@pytest.mark.parametrize("mirrored", [False, True])
def test_compiled_code_where_dynamo_folds_is_exporting_to_true(mirrored, monkeypatch):
    # Dynamo before torch 2.12 folds torch.compiler.is_exporting() to True while tracing, and
    # cannot trace the fake-mode query after it: every compiled sparse model failed there (the
    # GPU machine's torch 2.11 included). A trace by Dynamo is never the export guard's business.
    s, f = _compiled_get(mirrored, monkeypatch, "t_folded")

    def untraceable(*a):  # stands for the query older Dynamo cannot trace
        raise RuntimeError("the fake-mode query ran in a Dynamo trace")

    with s.bound(torch.ones(2)):
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True, raising=False)  # torch 2.6: none
        monkeypatch.setattr(_state, "_DYNAMO_KNOWS_EXPORT", False)
        monkeypatch.setattr(_state, "_fake_mode_here", untraceable)
        out = f(torch.zeros(2))
        monkeypatch.undo()
    assert torch.equal(out, torch.ones(2))


def test_export_guard_without_is_exporting(monkeypatch):
    # torch 2.6 has no torch.compiler.is_exporting: the guard took that for "never exporting",
    # so a non-strict export there recorded a `with` entered outside it silently. Without the
    # flag, the fake-tensor mode (non-strict export runs the model under one) answers alone.
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.delattr(torch.compiler, "is_exporting", raising=False)
    assert not _state._exporting_here()
    with FakeTensorMode():
        assert _state._exporting_here()
    monkeypatch.undo()
    if hasattr(torch.compiler, "is_exporting"):  # with the flag: a fake-tensor run alone is no export
        with FakeTensorMode():
            assert not _state._exporting_here()


def test_a_with_in_another_thread_warns():
    # nn.DataParallel's replicas run in threads, which start with an empty context: they would run
    # unmasked. A thread that sees no value while another thread's `with` is in force is warned.
    import threading
    import warnings

    s = _state.ContextState("t_thread", "block_mask")
    seen = []

    def replica():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            seen.append((s.get(), [str(x.message) for x in w]))
            s.get()  # once per state: a replica's every layer call must not warn again
            seen.append(len(w))

    with s.bound("mask"):
        assert s.get() == "mask"
        t = threading.Thread(target=replica)
        t.start()
        t.join()
    value, msgs = seen.pop(0)
    assert value is None and len(msgs) == 1 and "DataParallel" in msgs[0] and "block_mask" in msgs[0]
    assert seen.pop(0) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in force anywhere: no warning
        t = threading.Thread(target=lambda: seen.append(s.get()))
        t.start()
        t.join()
    assert seen[0] is None

"""The data-side classes in real DataLoader workers: they pickle into ``spawn`` workers with their
generator (torch's own Generator pickle failed there: "unable to resize file"), and the worker's
draws continue the stream the parent handed over."""
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import effssl_kernels as ek

pytest.importorskip("torchvision")


class _Draws(Dataset):
    """Item i: what each data-side object draws next (box, flip, photometric factors, crops)."""

    def __init__(self, crop, sampler, augment):
        self.crop, self.sampler, self.augment = crop, sampler, augment
        g = torch.Generator().manual_seed(0)
        self.img = torch.rand(3, 40, 40, generator=g)
        self.u8 = (self.img * 255).to(torch.uint8)[None]

    def __len__(self):
        return 2

    def __getitem__(self, i):
        v = self.crop(self.img)
        p = self.sampler.sample(2)
        m = self.augment(self.u8)
        return v.box_a, v.flip_a, p.brightness, m.boxes[0], m.params[1].contrast


def _objects():
    return (ek.TwoViewCrop(24, generator=torch.Generator().manual_seed(1)),
            ek.PhotometricSampler.simclr(generator=torch.Generator().manual_seed(2)),
            ek.MultiViewAugment.two_view(16, generator=torch.Generator().manual_seed(3)))


def test_generators_survive_a_spawn_worker():
    ds = _Draws(*_objects())
    ds.crop(ds.img)  # advance a generator: the worker continues from here
    want = [ds_copy[i] for ds_copy in [pickle.loads(pickle.dumps(ds))] for i in range(2)]
    got = list(DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn", timeout=120))
    assert len(got) == 2
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert torch.equal(a, b)


def test_pickled_generator_keeps_device_and_stream():
    for obj in _objects():
        obj.generator.manual_seed(5)
        torch.rand(3, generator=obj.generator)
        copy = pickle.loads(pickle.dumps(obj))
        assert isinstance(copy.generator, torch.Generator) and copy.generator is not obj.generator
        assert torch.equal(torch.rand(4, generator=copy.generator), torch.rand(4, generator=obj.generator))
    none = pickle.loads(pickle.dumps(ek.TwoViewCrop(8)))
    assert none.generator is None


def test_a_shared_generator_stays_shared():
    # A copy per object (the first version of the generator pickling) made the two samplers of
    # a MultiViewAugment repeat each other's draws after a deepcopy or a trip to a worker.
    import copy

    g = torch.Generator().manual_seed(0)
    aug = ek.MultiViewAugment.two_view(16, samplers=(ek.PhotometricSampler.byol(1, generator=g),
                                                     ek.PhotometricSampler.byol(2, generator=g)))
    imgs = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    want = aug(imgs).params
    g.manual_seed(0)
    for c in (copy.deepcopy(aug), pickle.loads(pickle.dumps(aug))):
        s1, s2 = (grp.sampler for grp in c.groups)
        assert s1.generator is s2.generator and s1.generator is not g
        got = c(imgs).params
        assert torch.equal(got[0].brightness, want[0].brightness)
        assert torch.equal(got[1].brightness, want[1].brightness)
        assert not torch.equal(got[0].brightness, got[1].brightness)


def test_generator_pickling_takes_no_weak_reference_to_it(monkeypatch):
    # torch.Generator takes no weak reference before torch 2.12: the stand-ins were kept in a
    # weak dict keyed by the generator, so every pickle of a sampler or crop with a generator
    # failed on torch 2.11 (the GPU machine's). Simulated here; sharing must still hold.
    import weakref

    real = weakref.ref

    def no_generators(obj, *callback):
        if isinstance(obj, torch.Generator):
            raise TypeError("cannot create weak reference to 'torch._C.Generator' object")
        return real(obj, *callback)

    monkeypatch.setattr(weakref, "ref", no_generators)
    g = torch.Generator().manual_seed(0)
    pair = (ek.PhotometricSampler.byol(1, generator=g), ek.TwoViewCrop(8, generator=g))
    a, b = pickle.loads(pickle.dumps(pair))
    assert a.generator is b.generator and a.generator is not g
    assert torch.equal(a.generator.get_state(), g.get_state())
    a2, b2 = pickle.loads(pickle.dumps(pair))  # a second dump: a new stand-in, the same state
    assert a2.generator is b2.generator and a2.generator is not a.generator


def test_copies_keep_the_generator_usable_and_shared():
    # copy.copy handed the pickle stand-in back as the generator (a TypeError at the next draw);
    # deepcopy shares the generator with plain references to it in the same structure.
    import copy

    g = torch.Generator().manual_seed(0)
    s = ek.PhotometricSampler.byol(1, generator=g)
    c = copy.copy(s)
    assert c.generator is g
    c.sample(2)
    holder = {"g": g, "sampler": s}
    h = copy.deepcopy(holder)
    assert h["sampler"].generator is h["g"] and h["g"] is not g

"""Photometric augmentations of SimCLR / BYOL / DINO with per-sample parameters (issue 7).

The chain, per sample, each step where its flag is set::

    colour jitter (brightness, contrast, saturation, hue in the sample's own random order)
    -> grayscale (3 channels kept) -> gaussian blur -> solarize -> normalise (mean/std)

:class:`PhotometricSampler` draws the per-sample parameters (seedable through a CPU
``torch.Generator``) and returns them as a :class:`PhotometricParams`, so a run is reproducible
and the same parameters can be fed to the reference and, later, to the fused kernel.
:func:`photometric` applies them with a fused kernel (C++ on the CPU, Triton on CUDA) whose oracle is the
plain-PyTorch reference :func:`effssl_kernels.reference.photometric.photometric_reference`,
which follows ``torchvision.transforms.v2.functional`` op by op (see that module for the exact
semantics).

Preset values (ImageNet, 224 px global views):

* SimCLR (Chen et al. 2020, appendix A): ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with strength
  ``s = 1`` applied with p=0.8, grayscale p=0.2, gaussian blur p=0.5 with sigma in [0.1, 2.0]
  and a kernel 10% of the image side (23 px at 224), no solarize.
* BYOL (Grill et al. 2020, table 6): ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale
  p=0.2, blur sigma in [0.1, 2.0] kernel 23 with p=1.0 for view 1 and p=0.1 for view 2,
  solarize p=0.0 for view 1 and p=0.2 for view 2.
* DINO (Caron et al. 2021, the official ``DataAugmentationDINO``): ColorJitter(0.4, 0.4, 0.2,
  0.1) p=0.8, grayscale p=0.2; global view 1: blur p=1.0; global view 2: blur p=0.1 and
  solarize p=0.2; local views (96 px): blur p=0.5; blur radius in [0.1, 2.0]. DINO blurs with
  PIL's ``GaussianBlur(radius)``; here it is torchvision's kernel with a fixed size (23).

All presets normalise with the ImageNet mean/std, as the official implementations do, and take
keyword overrides (``PhotometricSampler.byol(2, blur_kernel=9)``).

Solarize thresholds are in [0, 1] units whatever the input dtype: uint8 views are compared with
``threshold * 255`` (0.5 -> ``x >= 127.5``, i.e. ``x >= 128`` as ``PIL.ImageOps.solarize(img, 128)``).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ._utils import PicklesGenerator, int_arg
from .reference.photometric import blur_fits, blur_size_message

__all__ = ["PhotometricParams", "PhotometricSampler", "photometric", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PER_SAMPLE_FLOAT = ("brightness", "contrast", "saturation", "hue", "blur_sigma")
_PER_SAMPLE_BOOL = ("jitter_apply", "gray", "solarize")


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class PhotometricParams(NamedTuple):
    """Per-sample parameters of the photometric chain for ``N`` views.

    Fields (tensors on the views' device):
        brightness, contrast, saturation: float ``[N]`` factors >= 0 (1 = identity).
        hue: float ``[N]`` hue shift in [-0.5, 0.5] (0 = identity; a zero shift is skipped, as
            ColorJitter skips a hue of 0).
        jitter_apply: bool ``[N]``: colour jitter applied to this sample.
        order: int64 ``[N, 4]``: each row a permutation of 0..3 (0 brightness, 1 contrast,
            2 saturation, 3 hue), the order the jitter ops run in (ColorJitter's ``fn_idx``).
        gray: bool ``[N]``: grayscale (3 channels kept).
        blur_sigma: float ``[N]`` >= 0: gaussian blur sigma, 0 = no blur.
        blur_kernel: odd positive int, the blur kernel size (both axes).
        solarize: bool ``[N]``: solarize this sample.
        solarize_threshold: float in [0, 1] or float ``[N]`` tensor of them (in [0, 1] units;
            uint8 views are compared with ``threshold * 255``).
        mean, std: optional float ``[3]`` per-channel normalisation (both or neither); std != 0.
    """

    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    jitter_apply: Tensor
    order: Tensor
    gray: Tensor
    blur_sigma: Tensor
    blur_kernel: int
    solarize: Tensor
    solarize_threshold: Union[float, Tensor] = 0.5
    mean: Optional[Tensor] = None
    std: Optional[Tensor] = None

    @property
    def num_samples(self) -> int:
        return int(self.brightness.shape[0]) if isinstance(self.brightness, Tensor) else -1

    def to(self, device) -> "PhotometricParams":
        """The same parameters with every tensor moved to ``device``."""
        return PhotometricParams(*[v.to(device) if isinstance(v, Tensor) else v for v in self])

    def _value_rules(self):
        """Every rule on the parameter *values*, as ``(ok, message)`` pairs: ``ok`` a 0-d bool
        tensor on the parameters' device (no host sync), ``message()`` the error text. The one
        place these rules live: :meth:`check` raises the first failing one, :meth:`values_ok`
        ands them on the device."""
        # finite in float32, where the kernels compute: a float64 1e300 factor is inf there
        rules = [(torch.isfinite(getattr(self, n).float()).all(), lambda n=n: f"{n} must be finite (in float32)")
                 for n in _PER_SAMPLE_FLOAT]
        for n in ("brightness", "contrast", "saturation"):
            v = getattr(self, n)
            rules.append(((v >= 0).all(), lambda n=n, v=v: f"{n} factors must be >= 0, got min {float(v.min())}"))
        rules.append(((self.hue.abs() <= 0.5).all(),
                      lambda: f"hue shifts must be in [-0.5, 0.5], got max |hue| {float(self.hue.abs().max())}"))
        perm = self.order.sort(dim=1).values == torch.arange(4, device=self.order.device)
        rules.append((perm.all(), lambda: "order rows must be permutations of 0..3 (brightness, contrast, saturation, hue)"))
        rules.append(((self.blur_sigma >= 0).all(),
                      lambda: f"blur_sigma must be >= 0 (0 = no blur), got min {float(self.blur_sigma.min())}"))
        thr = self.solarize_threshold
        if isinstance(thr, Tensor):
            rules.append((((thr >= 0) & (thr <= 1)).all(), lambda: "solarize_threshold must be in [0, 1]"))
        if self.std is not None:
            # in float32, where the kernels normalise: a float64 1e-50 is 0 there, 1e39 is inf
            mean, std = self.mean.float(), self.std.float()
            rules.append((torch.isfinite(mean).all(), lambda: "mean must be finite (in float32)"))
            rules.append((torch.isfinite(std).all(), lambda: "std must be finite (in float32)"))
            rules.append(((std != 0).all(), lambda: f"std must be non-zero in float32, got {self.std.tolist()}"))
        return rules

    def blurs(self) -> Tensor:
        """bool ``[N]``: the samples that blur, ``blur_sigma > 0`` in float32 (where the kernels
        compute: a float64 sigma of 1e-50 is 0 there, and its Gaussian would be 0 / 0)."""
        return self.blur_sigma.float() > 0

    def values_ok(self) -> Tensor:
        """A 0-d bool tensor, on the parameters' device and without a host sync: every value in
        range (factors >= 0, |hue| <= 0.5, permutations, sigma >= 0, thresholds in [0, 1],
        std != 0, all finite). Call it on parameters that passed ``check(values=False)``."""
        return torch.stack([ok for ok, _ in self._value_rules()]).all()

    def check(self, N: int, device: Union[torch.device, str, None] = None, values: bool = True) -> None:
        """Raise ``TypeError``/``ValueError`` unless these are valid parameters for ``N`` views on
        ``device`` (``None``: any device, but all tensors on one). ``values=False`` checks types,
        shapes and devices only (no host sync; :meth:`values_ok` gives the rest as a tensor)."""
        where = "PhotometricParams"
        if device is not None:
            device = torch.device(device)
        devices = set()
        # the shape, not the num_samples property: torch 2.6's Dynamo cannot read a
        # property of a NamedTuple under torch.compile(fullgraph=True)
        if isinstance(self.brightness, Tensor) and self.brightness.dim() == 1 and self.brightness.shape[0] != N:
            raise ValueError(f"{where}: these parameters are for {self.brightness.shape[0]} views, the views have "
                             f"N={N} (draw them with sampler.sample({N}))")

        def _tensor(name, value, shape, kind):
            if not isinstance(value, Tensor):
                raise TypeError(f"{where}.{name} must be a torch.Tensor, got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise ValueError(f"{where}.{name} must have shape {list(shape)}, got {list(value.shape)}")
            if kind == "float" and not value.is_floating_point():
                raise TypeError(f"{where}.{name} must be a floating-point tensor, got {value.dtype}")
            if kind == "bool" and value.dtype != torch.bool:
                raise TypeError(f"{where}.{name} must be a bool tensor, got {value.dtype}")
            if kind == "int64" and value.dtype != torch.int64:
                raise TypeError(f"{where}.{name} must be an int64 tensor, got {value.dtype}")
            if device is not None and (
                value.device.type != device.type
                or (device.index is not None and value.device.index not in (None, device.index))
            ):
                raise ValueError(f"{where}.{name} is on {value.device}, expected {device} (use params.to(device))")
            devices.add(value.device)

        if not isinstance(N, int) or isinstance(N, bool) or N < 0:
            raise ValueError(f"{where}.check: N must be a non-negative int, got {N!r}")
        for name in _PER_SAMPLE_FLOAT:
            _tensor(name, getattr(self, name), (N,), "float")
        for name in _PER_SAMPLE_BOOL:
            _tensor(name, getattr(self, name), (N,), "bool")
        _tensor("order", self.order, (N, 4), "int64")
        k = self.blur_kernel
        if not isinstance(k, int) or isinstance(k, bool):
            raise TypeError(f"{where}.blur_kernel must be an int, got {type(k).__name__}")
        if k < 1 or k % 2 == 0:
            raise ValueError(f"{where}.blur_kernel must be an odd positive int, got {k}")
        thr = self.solarize_threshold
        if isinstance(thr, Tensor):
            _tensor("solarize_threshold", thr, (N,), "float")
        elif _is_real(thr):
            if not (0.0 <= float(thr) <= 1.0):
                raise ValueError(f"{where}.solarize_threshold must be in [0, 1], got {thr}")
        else:
            raise TypeError(f"{where}.solarize_threshold must be a float or a [N] tensor, got {type(thr).__name__}")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"{where}: mean and std must be given together (or both None)")
        if self.mean is not None:
            _tensor("mean", self.mean, (3,), "float")
            _tensor("std", self.std, (3,), "float")
        if len(devices) > 1:
            raise ValueError(f"{where}: tensors on several devices {sorted(map(str, devices))}")
        if values:
            for ok, message in self._value_rules():
                if not bool(ok):
                    raise ValueError(f"{where}.{message()}")


def _prob(value, name: str) -> float:
    if not _is_real(value):
        raise TypeError(f"PhotometricSampler: {name} must be a float, got {type(value).__name__}")
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"PhotometricSampler: {name} must be a probability in [0, 1], got {value}")
    return float(value)


class PhotometricSampler(PicklesGenerator):
    """Draws :class:`PhotometricParams` with torchvision v2's distributions, per sample.

    Args:
        jitter: ``(brightness, contrast, saturation, hue)`` strengths as ``ColorJitter``: the
            factors are uniform in ``[max(0, 1 - s), 1 + s]`` and the hue shift in ``[-h, h]``
            (``h <= 0.5``); a strength of 0 gives the identity factor.
        jitter_p: probability that a sample is colour-jittered (``RandomApply([ColorJitter])``).
        gray_p: probability of grayscale (``RandomGrayscale``).
        blur_p, blur_sigma, blur_kernel: probability of blurring, ``(min, max)`` of the uniform
            sigma (``0 < min <= max``) and the odd kernel size.
        solarize_p, solarize_threshold: probability and threshold (in [0, 1]) of solarizing.
        mean, std: per-channel normalisation, or both ``None`` for none.
        generator: optional CPU ``torch.Generator``; ``None`` draws from the global CPU RNG.
            In a DataLoader each worker gets a copy of ``generator`` (and, without persistent
            workers, each epoch a fresh copy of the unadvanced one), so workers and epochs would
            repeat the same draws: there leave it None (workers seed the global RNG) or reseed it
            in ``worker_init_fn`` from ``torch.utils.data.get_worker_info().seed``.

    The jitter order of each sample is a uniform random permutation of the 4 ops, as
    ColorJitter's ``torch.randperm(4)``. The draws are batched, so they follow torchvision's
    distributions, not its random stream.
    """

    def __init__(
        self,
        jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        blur_kernel: int = 23,
        solarize_p: float = 0.0,
        solarize_threshold: float = 0.5,
        mean: Optional[Sequence[float]] = IMAGENET_MEAN,
        std: Optional[Sequence[float]] = IMAGENET_STD,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if not isinstance(jitter, (tuple, list)) or len(jitter) != 4 or not all(_is_real(j) for j in jitter):
            raise TypeError(
                f"PhotometricSampler: jitter must be 4 floats (brightness, contrast, saturation, hue), got {jitter!r}"
            )
        if any(not math.isfinite(j) or j < 0 for j in jitter):
            raise ValueError(f"PhotometricSampler: jitter strengths must be finite and >= 0, got {tuple(jitter)}")
        if jitter[3] > 0.5:
            raise ValueError(f"PhotometricSampler: the hue strength must be in [0, 0.5], got {jitter[3]}")
        self.jitter = tuple(float(j) for j in jitter)
        self.jitter_p = _prob(jitter_p, "jitter_p")
        self.gray_p = _prob(gray_p, "gray_p")
        self.blur_p = _prob(blur_p, "blur_p")
        self.solarize_p = _prob(solarize_p, "solarize_p")
        self.solarize_threshold = _prob(solarize_threshold, "solarize_threshold")
        if (
            not isinstance(blur_sigma, (tuple, list))
            or len(blur_sigma) != 2
            or not all(_is_real(s) for s in blur_sigma)
        ):
            raise TypeError(f"PhotometricSampler: blur_sigma must be (min, max) floats, got {blur_sigma!r}")
        if not (0.0 < float(blur_sigma[0]) <= float(blur_sigma[1]) < math.inf):
            raise ValueError(
                f"PhotometricSampler: blur_sigma must be (min, max) with 0 < min <= max, got {tuple(blur_sigma)}"
            )
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        if not isinstance(blur_kernel, int) or isinstance(blur_kernel, bool):
            raise TypeError(f"PhotometricSampler: blur_kernel must be an int, got {type(blur_kernel).__name__}")
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ValueError(f"PhotometricSampler: blur_kernel must be an odd positive int, got {blur_kernel}")
        self.blur_kernel = int(blur_kernel)
        if (mean is None) != (std is None):
            raise ValueError("PhotometricSampler: mean and std must be given together (or both None)")
        if mean is not None:
            for name, v in (("mean", mean), ("std", std)):
                if not isinstance(v, (tuple, list)) or len(v) != 3 or not all(_is_real(x) for x in v):
                    raise TypeError(f"PhotometricSampler: {name} must be 3 floats, got {v!r}")
            # checked as the kernels use them, in float32 (which also refuses NaN and inf as given):
            # 1e-50 is zero and 1e39 is inf there
            f32 = torch.tensor((*mean, *std), dtype=torch.float32)
            if not bool(torch.isfinite(f32).all()) or bool((f32[3:] == 0).any()):
                raise ValueError(f"PhotometricSampler: std must be non-zero and mean and std finite in float32, "
                                 f"got {tuple(mean)}, {tuple(std)}")
            mean, std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        self.mean, self.std = mean, std
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(
                    f"PhotometricSampler: generator must be a torch.Generator, got {type(generator).__name__}"
                )
            if generator.device.type != "cpu":
                raise ValueError(
                    f"PhotometricSampler: generator must be a CPU generator, got one on {generator.device}"
                )
        self.generator = generator

    # ----------------------------------------------------------------------------------- presets
    @classmethod
    def simclr(cls, strength: float = 1.0, **overrides) -> "PhotometricSampler":
        """SimCLR: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) p=0.8, gray p=0.2, blur p=0.5."""
        s = float(strength)
        kw = dict(jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.0)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def _asymmetric(cls, name: str, view: int, overrides: dict) -> "PhotometricSampler":
        # BYOL's recipe, which DINO's global views reuse: view 1 always blurred, view 2 rarely
        # blurred and sometimes solarized.
        if view not in (1, 2):
            raise ValueError(f"PhotometricSampler.{name}: view must be 1 or 2, got {view!r}")
        kw = dict(
            jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2,
            blur_p=1.0 if view == 1 else 0.1, solarize_p=0.0 if view == 1 else 0.2,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def byol(cls, view: int = 1, **overrides) -> "PhotometricSampler":
        """BYOL view 1 (blur p=1.0, no solarize) or view 2 (blur p=0.1, solarize p=0.2)."""
        return cls._asymmetric("byol", view, overrides)

    @classmethod
    def dino_global(cls, view: int = 1, **overrides) -> "PhotometricSampler":
        """DINO global view 1 (blur p=1.0) or view 2 (blur p=0.1, solarize p=0.2): BYOL's."""
        return cls._asymmetric("dino_global", view, overrides)

    @classmethod
    def dino_local(cls, **overrides) -> "PhotometricSampler":
        """DINO local (96 px) views: blur p=0.5, no solarize."""
        kw = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.0)
        kw.update(overrides)
        return cls(**kw)

    # ---------------------------------------------------------------------------------- sampling
    def sample(self, N: int, device: Union[torch.device, str, None] = None,
               generator: Optional[torch.Generator] = None) -> PhotometricParams:
        """Draw parameters for ``N`` views on the CPU (from ``generator``, default the sampler's)
        and move them to ``device`` (default: keep them on the CPU, which :func:`photometric`
        takes for views on any device)."""
        int_arg("N", "PhotometricSampler.sample", N, 0)
        g = self.generator if generator is None else generator
        f32 = torch.float32

        def uniform(lo: float, hi: float) -> Tensor:
            return torch.rand(N, generator=g, dtype=f32) * (hi - lo) + lo

        b, c, s, h = self.jitter
        brightness = uniform(max(0.0, 1.0 - b), 1.0 + b)
        contrast = uniform(max(0.0, 1.0 - c), 1.0 + c)
        saturation = uniform(max(0.0, 1.0 - s), 1.0 + s)
        hue = uniform(-h, h).clamp_(-0.5, 0.5)
        order = torch.rand(N, 4, generator=g).argsort(dim=1)
        jitter_apply = torch.rand(N, generator=g) < self.jitter_p
        gray = torch.rand(N, generator=g) < self.gray_p
        blur = torch.rand(N, generator=g) < self.blur_p
        sigma = uniform(*self.blur_sigma)
        blur_sigma = torch.where(blur, sigma, torch.zeros_like(sigma))
        solarize = torch.rand(N, generator=g) < self.solarize_p
        mean = std = None
        if self.mean is not None:
            mean, std = torch.tensor(self.mean, dtype=f32), torch.tensor(self.std, dtype=f32)
        params = PhotometricParams(
            brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
            jitter_apply=jitter_apply, order=order, gray=gray, blur_sigma=blur_sigma,
            blur_kernel=self.blur_kernel, solarize=solarize, solarize_threshold=self.solarize_threshold,
            mean=mean, std=std,
        )
        return params if device is None else params.to(device)

    __call__ = sample

    def check_view_size(self, height: int, width: int, fn: str) -> None:
        """ValueError naming ``fn`` when this sampler may blur and its kernel does not fit
        ``height x width`` views: checked once up front, not only on the draws that blur."""
        if self.blur_p > 0 and not blur_fits(self.blur_kernel, height, width):
            raise ValueError(f"{fn}: blur_kernel {self.blur_kernel} is too large for {height}x{width} px views")

    def __repr__(self) -> str:
        return (
            f"PhotometricSampler(jitter={self.jitter}, jitter_p={self.jitter_p}, gray_p={self.gray_p}, "
            f"blur_p={self.blur_p}, blur_sigma={self.blur_sigma}, blur_kernel={self.blur_kernel}, "
            f"solarize_p={self.solarize_p}, solarize_threshold={self.solarize_threshold}, "
            f"mean={self.mean}, std={self.std})"
        )


def _check_views(views) -> None:
    if not isinstance(views, Tensor):
        raise TypeError(f"photometric: views must be a torch.Tensor, got {type(views).__name__}")
    if views.dim() != 4 or views.shape[1] != 3:
        raise ValueError(f"photometric: views must be [N, 3, H, W], got {list(views.shape)}")
    if views.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
        raise TypeError(f"photometric: views must be float32, float16, bfloat16 or uint8, got {views.dtype}")
    if views.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "photometric is forward only (augmentation): it has no gradient. Call it on views that do "
            "not require grad (e.g. views.detach()) or under torch.no_grad()."
        )


def photometric(views: Tensor, params: PhotometricParams) -> Tensor:
    """Apply the photometric chain with per-sample ``params`` to ``views`` ``[N, 3, H, W]``.

    float32/float16/bfloat16 views in [0, 1] or uint8 views in 0..255, any strides (channels_last
    in gives channels_last out). Output dtype: the input's, except uint8 with normalisation ->
    float32. Exact semantics (torchvision v2's, per transform): the reference module
    :mod:`effssl_kernels.reference.photometric`. ``params`` on the views' device, or on the CPU
    (as :class:`PhotometricSampler` draws them): then they are checked and packed there and
    copied through pinned memory, without a host sync.

    Kernels: C++ on CPU tensors, Triton on CUDA tensors (four launches, no host sync; see
    ``effssl_kernels/triton/photometric.py``). Float32 results match the reference within 2e-5
    for factors up to ~100 (the contrast mean's rounding grows with the saturation factor);
    uint8 intermediates are truncated to levels after every op as torchvision does, so a float
    rounding difference can move a value by one level (rare).

    Raises TypeError/ValueError on bad views or parameters. On CUDA the parameter *values*
    (ranges, permutations, the blur kernel fitting the views) are checked by a device-side assert
    instead, to avoid host syncs (``EFFSSL_CHECK_INDICES=1`` checks them on the host); a bad value
    there never reads out of bounds. CPU parameters are checked on the host, except inside
    ``torch.compile``, where a device-side (or, for CPU tensors, in-graph) assert checks them.
    """
    _check_views(views)
    N, _, H, W = views.shape
    if not isinstance(params, PhotometricParams):
        raise TypeError(f"photometric: params must be a PhotometricParams, got {type(params).__name__}")
    host_params = isinstance(params.brightness, Tensor) and params.brightness.device.type == "cpu"
    on_host = host_params or os.environ.get("EFFSSL_CHECK_INDICES", "0") == "1"
    compiling = torch.compiler.is_compiling()
    params.check(N, "cpu" if host_params else views.device, values=on_host and not compiling)
    k = params.blur_kernel
    if not blur_fits(k, H, W):
        blur_any = params.blurs().any()
        if on_host and not compiling:
            if bool(blur_any):
                raise ValueError(blur_size_message(k, H, W))
        else:
            torch._assert_async(~blur_any, blur_size_message(k, H, W))
    # Compiled, the host check would break the graph, so the values are asserted in it (Dynamo
    # itself turns a tensor `assert` into this op): the kernels run any id as some op, so an
    # unchecked bad value would be a silent wrong answer.
    if (compiling or not on_host) and N:
        torch._assert_async(params.values_ok(), "photometric: parameter values out of range (see PhotometricParams)")
    from .ops.photometric import run

    return run(views, params, N)

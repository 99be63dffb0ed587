"""Real photographs bundled with scikit-image and scikit-learn (no download), for the benchmarks
and studies that need natural image statistics: block similarity depends on them."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

# Everyday scenes stand in for ImageNet/CIFAR; the microscopy slide and the deep-field sky are
# kept for contrast but left out of the headline means, since their flat backgrounds match easily.
_SKIMAGE = (
    ("astronaut", "scene"), ("camera", "scene"), ("chelsea", "scene"), ("coffee", "scene"),
    ("rocket", "scene"), ("stereo_motorcycle", "scene"),
    ("immunohistochemistry", "scientific"), ("hubble_deep_field", "scientific"),
)
_SKLEARN = (("china.jpg", "scene"), ("flower.jpg", "scene"))


@dataclasses.dataclass
class Photo:
    name: str
    kind: str  # "scene" or "scientific"
    pixels: Tensor  # float32 [3, H, W] in [0, 1]


def _to_chw(array) -> Tensor:
    x = torch.tensor(array)  # a copy: skimage's arrays may be read-only
    if x.dtype == torch.bool:
        x = x.to(torch.uint8) * 255
    x = x.to(torch.float32) / (255.0 if not x.is_floating_point() else 1.0)
    if x.dim() == 2:
        x = x[None].expand(3, -1, -1)  # gray: the same value in R, G and B
    else:
        x = x[..., :3].permute(2, 0, 1)  # drop alpha
    return x.contiguous()


def load_photos() -> tuple[list[Photo], dict[str, str]]:
    """The bundled photographs that load offline, and ``{name: reason}`` for those that did not
    (some of skimage's images need pooch and a download)."""
    photos, skipped = [], {}
    try:
        import skimage.data
    except ImportError as e:
        skipped["skimage"] = str(e)
    else:
        for name, kind in _SKIMAGE:
            try:
                img = getattr(skimage.data, name)()
            except Exception as e:  # noqa: BLE001 - any failure just drops the image
                skipped[name] = f"{type(e).__name__}: {e}"[:120]
                continue
            if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
                img, name = img[0], name + "_left"
            photos.append(Photo(name, kind, _to_chw(img)))
    try:
        from sklearn.datasets import load_sample_image
    except ImportError as e:
        skipped["sklearn"] = str(e)
    else:
        for fname, kind in _SKLEARN:
            try:
                photos.append(Photo(fname.split(".")[0], kind, _to_chw(load_sample_image(fname))))
            except Exception as e:  # noqa: BLE001
                skipped[fname] = f"{type(e).__name__}: {e}"[:120]
    return photos, skipped



def photo_batch(n: int, size: tuple[int, int], device="cpu") -> Tensor:
    """uint8 ``[n, 3, *size]``: the everyday-scene photographs resized (antialiased, aspect
    ratio not kept) to ``size``, cycled."""
    photos = [F.interpolate(p.pixels[None], size=size, mode="bilinear", antialias=True, align_corners=False)
              for p in load_photos()[0] if p.kind == "scene"]
    if not photos:
        raise RuntimeError("no bundled photographs: pip install scikit-image scikit-learn")
    batch = torch.cat([photos[i % len(photos)] for i in range(n)])
    return (batch * 255).round().clamp(0, 255).to(torch.uint8).to(device)

"""Training-time augmentation: random resized crops of a whole batch at once, flips, RandAugment, MixUp/CutMix.

torchvision's RandomResizedCrop draws and cuts one image per call; for small images that Python
overhead is most of the loading time, so the boxes are drawn from the same distribution for a whole
epoch at once and cut for several batches by one ``roi_align``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torchvision.transforms import v2


def crop_boxes(
    crop: v2.RandomResizedCrop, count: int, height: int, width: int, generator: torch.Generator | None = None
) -> Tensor:
    """``count`` boxes (x1, y1, x2, y2) drawn from ``crop.make_params``'s distribution all at once: for
    each, up to 10 tries of an area fraction uniform in ``crop.scale`` and an aspect ratio log-uniform
    in ``crop.ratio``, the first whose box fits, at a uniform position; the central crop if none fits.
    make_params draws one box per call at ~55 µs, most of a small image's loading time."""
    tries = 10
    area = height * width * torch.empty(count, tries).uniform_(*crop.scale, generator=generator)
    log_ratio = math.log(crop.ratio[0]), math.log(crop.ratio[1])
    aspect = torch.empty(count, tries).uniform_(*log_ratio, generator=generator).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    top = (torch.rand(count, generator=generator) * (height - h + 1)).floor()
    left = (torch.rand(count, generator=generator) * (width - w + 1)).floor()
    central_w, central_h = width, height  # make_params' fallback: the largest central box within the ratios
    if width / height < min(crop.ratio):
        central_h = round(width / min(crop.ratio))
    elif width / height > max(crop.ratio):
        central_w = round(height * max(crop.ratio))
    none = ~fits.any(1)
    w, h = w.masked_fill(none, central_w), h.masked_fill(none, central_h)
    top, left = top.masked_fill(none, (height - central_h) // 2), left.masked_fill(none, (width - central_w) // 2)
    return torch.stack([left, top, left + w, top + h], 1)


def random_resized_crops(images: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Each of (N, C, H, W) uint8 images cut to its box (N, 4) of :func:`crop_boxes` and resized to
    ``size``, all by one bilinear ``roi_align`` instead of a resize per image, which costs several
    times more in Python. Unlike resizing the cut-out box, which repeats the box's edge beyond it,
    samples near the edge blend in the pixels just outside the box (TensorFlow's crop_and_resize)."""
    from torchvision.ops import roi_align

    boxes = torch.cat([torch.arange(len(images), dtype=torch.float32)[:, None], boxes], 1)
    out = roi_align(images.float(), boxes, list(size), sampling_ratio=1, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def augmentation(
    aug: dict[str, Any], size: int, classes: int
) -> tuple[v2.RandomResizedCrop, v2.Transform | None, v2.Transform | None]:
    """From the ``augment`` config section: the random crop, the other per-image transforms and the
    batch-level mix (MixUp/CutMix); None for those that are off."""
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=tuple(aug["crop_scale"]), antialias=True)
    per_image: list[v2.Transform] = []
    if aug["flip"]:
        per_image.append(v2.RandomHorizontalFlip())
    if aug["randaugment"]:
        per_image.append(v2.RandAugment())
    mixes = [
        cls(alpha=aug[key], num_classes=classes) for key, cls in (("mixup", v2.MixUp), ("cutmix", v2.CutMix)) if aug[key] > 0
    ]
    mix = None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
    return crop, v2.Compose(per_image) if per_image else None, mix

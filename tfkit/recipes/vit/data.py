"""The images a ViT reads: the built-in digits, image files decoded safely, and rows of fixed-size pixels.

The built-in data are the 1,797 real 8×8 handwritten digits that scikit-learn ships. User images
(files, or a Hugging Face dataset's image column) are decoded once, resized (shorter side) and
centre-cropped to data.image_size, and kept as flattened uint8 rows in datasets' cache. An image that
cannot be read or decoded is skipped and counted (:class:`tfkit.data.Unusable`: one warning naming the
first few; more than 1% of a split's images stop preparation with one error line).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from tfkit.data import check_labels, encode_once, list_column, report_unusable
from tfkit.errors import UsageError
from tfkit.progress import Preparing

# torchvision is imported where it is used: importing it costs 2 s, which every other recipe's
# start-up (and each resume after a crash) would pay

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's guard against decompression bombs: 89.5 million


def digits(seed: int) -> datasets.DatasetDict:
    """scikit-learn's 8×8 digits (ink 0..16 → 0..255) with a fixed stratified 70/10/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = [Image.fromarray((img * 255 / 16).round().astype(np.uint8), mode="L") for img in bunch.images]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    full = datasets.Dataset.from_dict({"image": images, "label": bunch.target.tolist()}, features=features)
    rest, test = full.train_test_split(test_size=0.2, stratify_by_column="label", seed=seed).values()
    train, validation = rest.train_test_split(test_size=0.125, stratify_by_column="label", seed=seed).values()
    return datasets.DatasetDict({"train": train, "validation": validation, "test": test})


def open_image(path: Path | str | None = None, data: bytes | None = None, channels: int = 3) -> Image.Image:
    """Decode an image file and convert it to L or RGB; transparency is laid over white. An image of
    more than MAX_PIXELS is refused from its header (at open), before it is decoded."""
    try:
        with warnings.catch_warnings():  # PIL only warns between MAX_PIXELS and twice as many
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UsageError(
            f"{path}: the image has more than the {MAX_PIXELS / 1e6:.0f} million pixels tfkit decodes (scale it down first)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"{path}: not a readable image ({type(e).__name__})") from None
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):  # 16-bit grey, which convert() would clip to white above 255
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("L" if channels == 1 else "RGB")


def resize(image: Image.Image, size: int) -> Tensor:
    """The image's shorter side resized to ``size`` (bilinear, antialiased) and centre-cropped square: (C, size, size) uint8."""
    from torchvision.transforms import v2

    tensor = v2.functional.resize(v2.functional.pil_to_tensor(image), size, antialias=True)
    return v2.functional.center_crop(tensor, [size, size])


def per_channel(values: list[float], channels: int) -> list[float]:
    """data.mean or data.std, one value per channel (a single value serves them all)."""
    return values * (channels if len(values) == 1 else 1)


def normalise(images: Tensor, data: dict[str, Any]) -> Tensor:
    """(B, C, H, W) uint8 → (pixel / 255 - mean) / std per channel, in float."""
    channels = images.size(1)
    mean = torch.tensor(per_channel(data["mean"], channels), device=images.device)
    std = torch.tensor(per_channel(data["std"], channels), device=images.device)
    return (images.float() / 255 - mean[:, None, None]) / std[:, None, None]


def pixels(rows: pa.Table, data: dict[str, Any]) -> Tensor:
    """The stored (flattened) pixel rows of an Arrow table as one (N, C, H, W) uint8 tensor."""
    return list_column(rows, "pixels")[0].view(-1, data["channels"], data["image_size"], data["image_size"])


def median_image_size(rows: datasets.Dataset, data: dict[str, Any]) -> tuple[int, str]:
    """The median shorter side of up to 200 training images, in multiples of 8, at most
    data.max_image_size; and why."""
    column, cap = data["image_column"], data["max_image_size"]
    if isinstance(rows.features[column], datasets.Image):
        rows = rows.cast_column(column, datasets.Image(decode=False))
    sides = []
    for cell in rows.select(range(0, len(rows), max(1, len(rows) // 200)))[column]:
        source = (
            Path(data["name"]).parent / cell
            if isinstance(cell, str)
            else (cell.get("path") if cell.get("bytes") is None else io.BytesIO(cell["bytes"]))
        )
        try:
            with Image.open(source) as image:  # reads the header only
                sides.append(min(image.size))
        except (OSError, ValueError):
            continue  # an unreadable image is reported when the images are decoded
    if not sides:
        raise UsageError("none of the training images sampled for data.image_size could be read")
    median = int(np.median(sides))
    size = max(8, min(median, cap) // 8 * 8)
    capped = f", capped at data.max_image_size {cap} (--preset small or base allow more)" if median > cap else ""
    return size, f"the median shorter side of {len(sides)} training images is {median} px{capped}"


def decode_images(rows: datasets.Dataset, split: str, data: dict[str, Any], labels: list[str]) -> datasets.Dataset:
    """Rows of pixels at data.image_size (uint8, flattened) and class index, encoded once into
    datasets' cache, with progress shown; an unreadable image is left with target -1 and counted
    (:func:`report_unusable`: a warning, or one error line past 1% of the split)."""
    image_column, label_column = data["image_column"], data["label_column"]
    feature = rows.features[label_column]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    if isinstance(rows.features[image_column], datasets.Image):
        rows = rows.cast_column(image_column, datasets.Image(decode=False))
    base = Path(data["name"]).parent  # paths in a .csv/.jsonl are relative to that file
    index = {name: i for i, name in enumerate(labels)}
    check_labels((names[label] if names is not None else str(label) for label in rows[label_column][:]), index, split)

    def decode(batch: dict[str, list], _: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"pixels": [], "target": [], "problem": []}
        for cell, label in zip(batch[image_column], batch[label_column]):
            label = names[label] if names is not None else str(label)
            row, target, problem = np.zeros(0, np.uint8), index[label], ""
            path = base / cell if isinstance(cell, str) else cell.get("path")
            try:
                if isinstance(cell, str) or cell.get("bytes") is None:
                    image = open_image(path, channels=data["channels"])
                else:
                    image = open_image(path, data=cell["bytes"], channels=data["channels"])
                row = resize(image, data["image_size"]).flatten().numpy()
            except UsageError as e:
                target, problem = -1, str(e)
            shown.advance(1, _size(cell, path))
            out["pixels"].append(row)
            out["target"].append(target)
            out["problem"].append(problem)
        return out

    settings = [split, *(data[k] for k in ("name", "image_column", "label_column", "channels", "image_size")), labels]
    columns = datasets.Features(
        {
            "pixels": datasets.Sequence(datasets.Value("uint8")),
            "target": datasets.Value("int64"),
            "problem": datasets.Value("string"),
        }
    )
    with Preparing(f"decoding the {split} images", total=len(rows), unit="images") as shown:
        done = encode_once(rows, decode, settings, columns)
    report_unusable(done, split, "images")
    return done


def _size(cell: str | dict, path: Path | str | None) -> int:
    """The bytes an image cell holds or names (0 where its file is missing)."""
    if isinstance(cell, dict) and cell.get("bytes") is not None:
        return len(cell["bytes"])
    try:
        return os.path.getsize(path)
    except (OSError, TypeError):
        return 0

"""Image classification with the Vision Transformer (Dosovitskiy et al., 2021).

Patches as tokens through a strided convolution, a learned [CLS] token, learned positions (resampled
when the image size changes), pre-LN blocks with GELU, a final LayerNorm and a linear head on [CLS].
AdamW with warmup-cosine, label smoothing, torchvision v2 augmentation. The built-in data are the
1,797 real 8×8 handwritten digits that scikit-learn ships.
"""

from __future__ import annotations

import io
import json
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, TextIO

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn

from tfkit import config as configs
from tfkit import run as runs
from tfkit.data import (
    check_labels,
    derive_seed,
    encode_once,
    label_names,
    list_column,
    load_splits,
    report_unusable,
    require_columns,
    seeded_generator,
    seeded_global_rng,
)
from tfkit.errors import UsageError
from tfkit.hf import (
    Rename,
    activation_from_hf,
    activation_to_hf,
    from_hf,
    labels_config,
    read_config,
    read_weights,
    to_hf,
    write_folder,
)
from tfkit.inspect import attention_rollout, draw_overlays
from tfkit.nn.blocks import Encoder
from tfkit.nn.dropout import Dropout
from tfkit.nn.embeddings import PatchEmbedding
from tfkit.nn.position import resize_grid
from tfkit.onnx import Graph
from tfkit.recipe import (
    AttentionExample,
    Batch,
    Loss,
    Recipe,
    batch_ranges,
    for_each_file,
)
from tfkit.registry import register

if TYPE_CHECKING:
    from torchvision.transforms import v2

# torchvision is imported where it is used: importing it costs 2 s, which every other recipe's
# start-up (and each resume after a crash) would pay

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
READ_AHEAD_PIXELS = 1 << 22  # ~4 MB of uint8 pixels (×8 in float while cropping): a whole epoch of 8×8 digits


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


MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's guard against decompression bombs: 89.5 million


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
        raise UsageError(f"{path}: the image has more than the {MAX_PIXELS / 1e6:.0f} million pixels tfkit decodes "
                         f"(scale it down first)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"{path}: not a readable image ({type(e).__name__})") from None
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):  # 16-bit grey, which convert() would clip to white above 255
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("L" if channels == 1 else "RGB")


def crop_boxes(crop: v2.RandomResizedCrop, count: int, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
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


MAX_GRID = 14  # patches a side at most: ViT-B/16's 14×14 at 224 pixels


def patch_for(image_size: int) -> tuple[int, str]:
    """The smallest patch that divides ``image_size`` into at most MAX_GRID × MAX_GRID patches."""
    patch = next(p for p in range(2, image_size + 1) if image_size % p == 0 and image_size // p <= MAX_GRID)
    grid = image_size // patch
    return patch, f"the smallest patch that cuts {image_size} px into at most {MAX_GRID}×{MAX_GRID}: {grid}×{grid} patches"


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, channels: int, classes: int, patch: int, d_model: int, depth: int,
                 heads: int, d_ff: int, dropout: float, drop_path: float, activation: str, block: str, norm_eps: float):
        super().__init__()
        if image_size % patch:
            raise UsageError(f"data.image_size {image_size} is not a multiple of model.patch {patch}")
        self.patch = patch
        self.grid = (image_size // patch, image_size // patch)
        self.patches = PatchEmbedding(channels, d_model, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.position = nn.Parameter(torch.empty(1 + self.grid[0] * self.grid[1], d_model))  # [CLS] + patches
        self.dropout = Dropout(dropout)
        self.encoder = Encoder(block, depth, d_model, heads, d_ff, dropout, activation, drop_path=drop_path)
        self.head = nn.Linear(d_model, classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.eps = norm_eps
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, images: Tensor, every_position: bool = False) -> Tensor:
        """(B, C, H, W) → class logits (B, classes); any H and W divisible by the patch size.

        Only [CLS] feeds the head, so the last block computes its output at [CLS] alone: the same
        logits, and most of that block's work saved. ``every_position`` runs it in full, to inspect
        the last block's attention from every patch."""
        tokens = self.patches(images)
        grid = (images.size(-2) // self.patch, images.size(-1) // self.patch)
        position = torch.cat([self.position[:1], resize_grid(self.position[1:], self.grid, grid)])
        x = torch.cat([self.cls.expand(tokens.size(0), -1, -1), tokens], dim=1) + position
        return self.head(self.encoder(self.dropout(x), outputs=None if every_position else 1)[:, 0])


@register("recipe", "vit")
class ViT(Recipe):
    """Vision Transformer for image classification: patches, [CLS], pre-LN, attention rollout."""

    config_file = "vit.yaml"
    ranges = configs.ranges(
        (*configs.AT_LEAST_1, ("depth", "patch", "channels", "image_size")),
        (*configs.OFF_AT_0, ("mixup", "cutmix")),
        (*configs.POSITIVE, ("std",)),
    )
    BUILTIN_SIZES = {"data.image_size": 8, "model.patch": 2, "train.steps": 4000}  # the 8×8 digits
    unit = "img"
    labels: list[str]

    # -- data -------------------------------------------------------------------------------------
    def prepare(self, run_dir: Path | None = None) -> None:
        data, seed = self.config["data"], self.config["seed"]
        for key in ("mean", "std"):
            if len(data[key]) not in (1, data["channels"]):
                raise UsageError(f"data.{key} has {len(data[key])} values (give one, or one per channel: {data['channels']})")
        scale = self.config["augment"]["crop_scale"]
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise UsageError(f"augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {scale}")
        splits = load_splits(data["name"], lambda: digits(seed), seed, hub_config=data["hub_config"])
        for split, rows in splits.items():
            self._require_columns(rows, split)
        if run_dir is not None:
            self.load(run_dir)
        else:
            self.labels = label_names(splits["train"], data["label_column"])
        self.settle("data.image_size", lambda: self._image_size(splits["train"]))
        self.settle("model.patch", lambda: patch_for(data["image_size"]))
        self.settle_steps(len(splits["train"]))
        # validation and test images are held in memory; the training split's go into an Arrow table
        # (in datasets' cache when the images come from files), read a few batches at a time, so a
        # corpus of any size costs memory only for its labels
        self.train = self._decode(splits["train"], "train")
        # once: with_format deep-copies. (pyarrow's Table.take would gather faster, but it first
        # concatenates the column's chunks, the whole memory-mapped column on every call.)
        self.train_table = self.train.with_format("arrow", columns=["pixels", "target"])
        self.train_rows = torch.from_numpy(np.flatnonzero(self.train_table["target"].to_numpy() >= 0))
        self.images, self.targets = {}, {}
        for split in ("validation", "test"):
            held = self._decode(splits[split], split).filter(lambda target: target >= 0, input_columns="target")
            self.images[split] = self._pixels(held.with_format("arrow")[:])
            self.targets[split] = torch.tensor(held["target"][:])

    def imitate_builtin_data(self) -> None:
        self.labels = [str(digit) for digit in range(10)]
        self.settle_builtin()

    def _image_size(self, rows: datasets.Dataset) -> tuple[int, str]:
        """The median shorter side of up to 200 training images, in multiples of 8, at most
        data.max_image_size; and why."""
        data = self.config["data"]
        column, cap = data["image_column"], data["max_image_size"]
        if isinstance(rows.features[column], datasets.Image):
            rows = rows.cast_column(column, datasets.Image(decode=False))
        sides = []
        for cell in rows.select(range(0, len(rows), max(1, len(rows) // 200)))[column]:
            source = Path(data["name"]).parent / cell if isinstance(cell, str) else (cell.get("path") if cell.get("bytes") is None else io.BytesIO(cell["bytes"]))
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

    def _require_columns(self, rows: datasets.Dataset, split: str) -> None:
        data = self.config["data"]
        require_columns(rows, split, [data["image_column"], data["label_column"]], "data.image_column and data.label_column")

    def _decode(self, rows: datasets.Dataset, split: str) -> datasets.Dataset:
        """Rows of pixels at the configured size (uint8, flattened) and class index; an unreadable
        image is reported in one warning and left with target -1."""
        data = self.config["data"]
        image_column, label_column = data["image_column"], data["label_column"]
        feature = rows.features[label_column]
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        if isinstance(rows.features[image_column], datasets.Image):
            rows = rows.cast_column(image_column, datasets.Image(decode=False))
        base = Path(data["name"]).parent  # paths in a .csv/.jsonl are relative to that file
        index = {name: i for i, name in enumerate(self.labels)}
        check_labels((names[label] if names is not None else str(label) for label in rows[label_column][:]), index, split)

        def decode(batch: dict[str, list], _: list[int]) -> dict[str, list]:
            out: dict[str, list] = {"pixels": [], "target": [], "problem": []}
            for cell, label in zip(batch[image_column], batch[label_column]):
                label = names[label] if names is not None else str(label)
                pixels, target, problem = np.zeros(0, np.uint8), index[label], ""
                try:
                    if isinstance(cell, str):
                        image = open_image(base / cell, channels=data["channels"])
                    else:
                        image = open_image(cell.get("path"), data=cell.get("bytes"), channels=data["channels"])
                    pixels = self._resize(image).flatten().numpy()
                except UsageError as e:
                    target, problem = -1, str(e)
                out["pixels"].append(pixels)
                out["target"].append(target)
                out["problem"].append(problem)
            return out

        settings = [split, *(data[k] for k in ("name", "image_column", "label_column", "channels", "image_size")), self.labels]
        columns = datasets.Features({"pixels": datasets.Sequence(datasets.Value("uint8")), "target": datasets.Value("int64"),
                                     "problem": datasets.Value("string")})
        done = encode_once(rows, decode, settings, columns)
        report_unusable(done, split, "unreadable images")
        return done

    def _pixels(self, rows: pa.Table) -> Tensor:
        """The stored (flattened) pixel rows of an Arrow table as one (N, C, H, W) uint8 tensor."""
        size, channels = self.config["data"]["image_size"], self.config["data"]["channels"]
        return list_column(rows, "pixels")[0].view(-1, channels, size, size)

    def _resize(self, image: Image.Image) -> Tensor:
        from torchvision.transforms import v2

        size = self.config["data"]["image_size"]
        tensor = v2.functional.pil_to_tensor(image)
        tensor = v2.functional.resize(tensor, size, antialias=True)
        return v2.functional.center_crop(tensor, [size, size])

    def _normalise(self, images: Tensor) -> Tensor:
        data = self.config["data"]
        channels = images.size(1)
        mean = torch.tensor(data["mean"] * (channels if len(data["mean"]) == 1 else 1), device=images.device)
        std = torch.tensor(data["std"] * (channels if len(data["std"]) == 1 else 1), device=images.device)
        return (images.float() / 255 - mean[:, None, None]) / std[:, None, None]

    def save(self, run_dir: Path) -> None:
        runs.write_json(run_dir, "labels.json", self.labels)

    def load(self, run_dir: Path) -> None:
        self.labels = runs.read_json(run_dir, "labels.json")

    def build_model(self) -> nn.Module:
        m, data = self.config["model"], self.config["data"]
        return VisionTransformer(
            data["image_size"], data["channels"], len(self.labels), m["patch"], m["d_model"], m["depth"], m["heads"],
            m["d_ff"], m["dropout"], m["drop_path"], m["activation"], m["block"], m["norm_eps"],
        )

    # -- training ---------------------------------------------------------------------------------
    def _augmentation(self) -> tuple[v2.RandomResizedCrop, v2.Transform | None, v2.Transform | None]:
        """The random crop, the other per-image transforms and the batch-level mix (MixUp/CutMix);
        None for those that are off."""
        from torchvision.transforms import v2

        aug, size = self.config["augment"], self.config["data"]["image_size"]
        crop = v2.RandomResizedCrop(size, scale=tuple(aug["crop_scale"]), antialias=True)
        per_image: list[v2.Transform] = []
        if aug["flip"]:
            per_image.append(v2.RandomHorizontalFlip())
        if aug["randaugment"]:
            per_image.append(v2.RandAugment())
        classes = len(self.labels)
        mixes = [cls(alpha=aug[key], num_classes=classes) for key, cls in (("mixup", v2.MixUp), ("cutmix", v2.CutMix)) if aug[key] > 0]
        mix = None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
        return crop, v2.Compose(per_image) if per_image else None, mix

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        size, seed = self.config["train"]["batch_size"], self.config["seed"]
        crop, per_image, mix = self._augmentation()
        generator = seeded_generator(seed, epoch)
        rows = self.train_rows[torch.randperm(len(self.train_rows), generator=generator)]
        data = self.config["data"]
        # the epoch's boxes in one draw (every stored image has the configured size): drawn per
        # batch, they cost more than the cropping itself
        boxes = crop_boxes(crop, len(rows), data["image_size"], data["image_size"], generator)
        # read and crop several batches at once, up to READ_AHEAD_PIXELS: for small images, each
        # Arrow read and roi_align call costs more than the pixels it handles
        pixels = data["channels"] * data["image_size"] ** 2
        chunk = size * max(1, READ_AHEAD_PIXELS // (size * pixels))
        for first in range(0, len(rows), chunk):
            part = self.train_table[rows[first : first + chunk].tolist()]  # Arrow to tensors: numpy formatting goes row by row
            crops = random_resized_crops(self._pixels(part), boxes[first : first + chunk], crop.size)
            targets = torch.tensor(part["target"].to_numpy())
            for start in range(0, len(crops), size):
                images, labels = crops[start : start + size], targets[start : start + size]
                b = (first + start) // size
                with seeded_global_rng(derive_seed(seed, epoch, b)):  # torchvision's draws
                    if per_image is not None:
                        images = torch.stack([per_image(image) for image in images])
                    images = self._normalise(images)
                    if mix is not None:
                        images, labels = mix(images, labels)
                yield {"images": images, "labels": labels}

    def loss(self, model: nn.Module, batch: Batch) -> Loss:
        logits = model(batch["images"])
        total = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.config["train"]["label_smoothing"], reduction="sum")
        return Loss([(total, len(logits))], len(logits))

    # -- using the model --------------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, model: nn.Module, images: Tensor) -> Tensor:
        """(B, C, H, W) uint8 images → (B, classes) on the CPU."""
        model.eval()
        device = next(model.parameters()).device
        return model(self._normalise(images.to(device))).float().softmax(-1).cpu()

    def eval_outputs(self, model: nn.Module, split: str, rank: int = 0, world: int = 1) -> dict[int, tuple[bool, float, bool]]:
        """Per image: whether the top label is right, the log-probability of the right label, and
        whether the right label is among the top 5."""
        images, targets, out = self.images[split], self.targets[split], {}
        for places in batch_ranges(len(images), self.config["predict"]["batch_size"], rank, world):
            probs, target = self.probabilities(model, images[places.start : places.stop]), targets[places.start : places.stop]
            ranked = probs.topk(min(5, len(self.labels)), dim=-1).indices
            log_probs = probs.gather(1, target[:, None]).squeeze(1).clamp_min(1e-12).log()
            hits = ranked == target[:, None]
            out.update(zip(places, zip(hits[:, 0].tolist(), log_probs.tolist(), hits.any(-1).tolist())))
        return out

    def score(self, split: str, outputs: list[tuple[bool, float, bool]]) -> dict[str, float]:
        n = len(outputs)
        metrics = {"accuracy": 100.0 * sum(top for top, _, _ in outputs) / n, "loss": -sum(lp for _, lp, _ in outputs) / n}
        if len(self.labels) > 5:
            metrics["top5_accuracy"] = 100.0 * sum(top5 for _, _, top5 in outputs) / n
        return metrics

    def predict_file(self, model: nn.Module, path: Path, out: TextIO, top_k: int | None = None) -> None:
        """One line per image: path, then the top-k labels with their probabilities. A folder is
        classified image by image; unreadable ones are reported and the rest still come out."""
        top_k = min(top_k or self.config["predict"]["top_k"], len(self.labels))
        for_each_file(path, IMAGE_SUFFIXES, "images", lambda image_path: self._predict_image(model, image_path, out, top_k))

    def _predict_image(self, model: nn.Module, path: Path, out: TextIO, top_k: int) -> None:
        image = self._resize(open_image(path, channels=self.config["data"]["channels"]))
        (probs,) = self.probabilities(model, image[None])
        values, indices = probs.topk(top_k)
        ranked = "\t".join(f"{self.labels[i]} {p:.3f}" for p, i in zip(values.tolist(), indices.tolist()))
        out.write(f"{path}\t{ranked}\n")

    def attention_example(self, model: nn.Module, text: str) -> AttentionExample:
        image = self._resize(open_image(Path(text), channels=self.config["data"]["channels"]))
        device = next(model.parameters()).device
        model.eval()
        rows, cols = image.size(1) // model.patch, image.size(2) // model.patch
        tokens = ["[CLS]"] + [f"patch {r},{c}" for r in range(rows) for c in range(cols)]
        picture = image.permute(1, 2, 0).float().numpy() / 255

        def rollout(weights: dict[str, np.ndarray]) -> np.ndarray:
            return attention_rollout([weights[name] for name in sorted(weights, key=lambda n: int(n.split(".")[2]))])

        def draw(weights: dict[str, np.ndarray], out_dir: Path) -> None:
            for name, w in weights.items():
                maps = [(f"head {h}", w[h, 0, 1:].reshape(rows, cols)) for h in range(w.shape[0])]
                draw_overlays(picture, maps, f"{name}: [CLS] → patches", out_dir / f"{name}.png")
            flow = rollout(weights)
            np.save(out_dir / "rollout.npy", flow)
            draw_overlays(picture, [("rollout", flow[0, 1:].reshape(rows, cols))], "attention rollout, [CLS] → patches", out_dir / "rollout.png")

        def page(weights: dict[str, np.ndarray]) -> dict:
            return {"panels": [{
                "kind": "image", "title": "[CLS] → patches over the image, and rollout through all layers",
                "pixels": picture.squeeze(-1) if picture.shape[-1] == 1 else picture,
                "overlay": {"query": 0, "keys": [1, 1 + rows * cols], "grid": [rows, cols]},
                "maps": {"rollout": rollout(weights)[0, 1:].reshape(rows, cols)},
            }]}

        return AttentionExample(
            run=lambda: model(self._normalise(image[None].to(device)), every_position=True),
            tokens={"tokens": tokens},
            axes=lambda name: ("tokens", "tokens"),
            draw=draw,
            page=page,
            meta={"grid": [rows, cols], "patch": model.patch, "image_size": list(image.shape[1:])},
        )

    # -- Hugging Face weights ---------------------------------------------------------------------
    @classmethod
    def pretrained_config(cls, path: Path) -> dict[str, Any]:
        """The config keys a transformers ViT folder fixes: sizes, image size, channels, normalisation."""
        hf = read_config(path, "vit", "a ViT")
        if not hf.get("qkv_bias", True):
            raise UsageError(f"{path}: only ViTs with query/key/value biases can be imported")
        overrides: dict[str, Any] = {
            "model": {
                "patch": hf["patch_size"], "d_model": hf["hidden_size"], "depth": hf["num_hidden_layers"],
                "heads": hf["num_attention_heads"], "d_ff": hf["intermediate_size"],
                "activation": activation_from_hf(path, hf.get("hidden_act", "gelu")),
                "block": "pre_ln", "norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
            },
            "data": {"image_size": hf["image_size"], "channels": hf.get("num_channels", 3)},
        }
        if (path / "preprocessor_config.json").is_file():
            pre = _read_json(path / "preprocessor_config.json")
            overrides["data"].update({k: [float(v) for v in pre[f"image_{k}"]] for k in ("mean", "std") if f"image_{k}" in pre})
        return overrides

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        """Copy a transformers ViT (ViTModel or ViTForImageClassification) into ``model``. The
        classifier comes along when it has as many classes as this run; otherwise it starts fresh."""
        hf = read_weights(path, "vit.")
        try:
            ours = from_hf(hf, vit_renames(len(model.encoder.layers)))
            ours["position"] = ours["position"][0]
        except KeyError as e:
            raise UsageError(f"{path / 'model.safetensors'} is not a transformers ViT checkpoint (no tensor {e})") from None
        head = hf.get("classifier.weight")
        if head is not None and head.shape == model.head.weight.shape:
            ours["head.weight"], ours["head.bias"] = head, hf["classifier.bias"]
        else:
            print(f"note: the classifier starts fresh for {len(self.labels)} classes", file=sys.stderr)
        missing, unexpected = model.load_state_dict(ours, strict=False)
        if unexpected or set(missing) - {"head.weight", "head.bias"}:
            raise UsageError(f"{path}: the weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")

    def export_hf(self, model: nn.Module, out: Path) -> None:
        """A ViTForImageClassification folder, with the resizing and normalisation in preprocessor_config.json."""
        m, data = self.config["model"], self.config["data"]
        if m["block"] != "pre_ln":
            raise UsageError(f"model.block '{m['block']}' has no transformers ViT equivalent (ViT is pre_ln)")
        config = {
            "model_type": "vit", "architectures": ["ViTForImageClassification"], "image_size": data["image_size"],
            "patch_size": m["patch"], "num_channels": data["channels"], "hidden_size": m["d_model"],
            "num_hidden_layers": m["depth"], "num_attention_heads": m["heads"], "intermediate_size": m["d_ff"],
            "hidden_act": activation_to_hf(m["activation"]), "layer_norm_eps": m["norm_eps"], "qkv_bias": True,
            "hidden_dropout_prob": m["dropout"], "attention_probs_dropout_prob": m["dropout"], **labels_config(self.labels),
        }
        ours = model.state_dict()
        hf = {f"vit.{k}": v for k, v in to_hf({**ours, "position": ours["position"][None]}, vit_renames(m["depth"])).items()}
        write_folder(out, config, {**hf, "classifier.weight": ours["head.weight"], "classifier.bias": ours["head.bias"]})
        channels = data["channels"]
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": data["image_size"], "width": data["image_size"]}, "resample": 2,  # bilinear, as torchvision's resize
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": data["mean"] * (channels if len(data["mean"]) == 1 else 1),
            "image_std": data["std"] * (channels if len(data["std"]) == 1 else 1),
        }, indent=2) + "\n", encoding="utf-8")


    def onnx_graphs(self, model: nn.Module) -> list[Graph]:
        """Normalised (B, C, H, W) images at data.image_size → logits (B, classes)."""
        data = self.config["data"]

        def example(batch: int, length: int) -> dict[str, Tensor]:
            images = torch.randint(0, 256, (batch, data["channels"], data["image_size"], data["image_size"]),
                                   dtype=torch.uint8, generator=torch.Generator().manual_seed(batch))
            return {"pixel_values": self._normalise(images)}

        return [Graph("model", model, example, ["logits"], {"pixel_values": {0: "batch"}})]

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        data, channels = self.config["data"], self.config["data"]["channels"]
        return {"image_size": data["image_size"], "channels": channels, "labels": self.labels,
                "mean": data["mean"] * (channels if len(data["mean"]) == 1 else 1),
                "std": data["std"] * (channels if len(data["std"]) == 1 else 1),
                "inputs": "pixel_values: the image as L (channels 1) or RGB, transparency over white, its shorter side resized "
                          "to image_size (bilinear, antialiased) and centre-cropped square, then (pixel / 255 - mean) / std",
                "outputs": "logits (B, classes): softmax for each label's probability"}


def vit_renames(depth: int) -> list[Rename]:
    """:class:`VisionTransformer`'s tensors and ViTModel's; query, key and value are our one fused
    projection. (transformers keeps the positions as (1, N, D), we as (N, D).)"""
    renames = [
        Rename("cls", "embeddings.cls_token"),
        Rename("position", "embeddings.position_embeddings"),
        Rename("patches.proj.weight", "embeddings.patch_embeddings.projection.weight"),
        Rename("patches.proj.bias", "embeddings.patch_embeddings.projection.bias"),
        Rename("encoder.norm.weight", "layernorm.weight"),
        Rename("encoder.norm.bias", "layernorm.bias"),
    ]
    for i in range(depth):
        theirs, mine = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for part in ("weight", "bias"):
            renames += [
                Rename(f"{mine}self_attn.in_proj.{part}", tuple(f"{theirs}attention.attention.{p}.{part}" for p in ("query", "key", "value"))),
                Rename(f"{mine}self_attn.out_proj.{part}", f"{theirs}attention.output.dense.{part}"),
                Rename(f"{mine}feed_forward.up.{part}", f"{theirs}intermediate.dense.{part}"),
                Rename(f"{mine}feed_forward.down.{part}", f"{theirs}output.dense.{part}"),
                Rename(f"{mine}norm1.{part}", f"{theirs}layernorm_before.{part}"),
                Rename(f"{mine}norm2.{part}", f"{theirs}layernorm_after.{part}"),
            ]
    return renames


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None

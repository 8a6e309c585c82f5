"""The ViT recipe (``vit``): image classification with the hooks the trainer calls.

Data are decoded once (``data``); training batches are random resized crops of several batches at a
time, with the optional flips, RandAugment and MixUp/CutMix (``augment``); the loss is label-smoothed
cross-entropy; metrics are accuracy, loss and top-5 accuracy; predict ranks each image's labels, and
inspect draws [CLS]'s attention over the image and its rollout through the layers. AdamW with
warmup-cosine comes from the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, TextIO

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfkit import config as configs
from tfkit import run as runs
from tfkit.data import (
    derive_seed,
    label_names,
    load_splits,
    require_columns,
    seeded_generator,
    seeded_global_rng,
)
from tfkit.errors import UsageError
from tfkit.inspect import attention_rollout, draw_overlays
from tfkit.onnx import Graph
from tfkit.recipe import (
    AttentionExample,
    Batch,
    Loss,
    Recipe,
    batch_ranges,
    for_each_file,
)
from tfkit.recipes.vit import interop
from tfkit.recipes.vit.augment import augmentation, crop_boxes, random_resized_crops
from tfkit.recipes.vit.data import (
    IMAGE_SUFFIXES,
    decode_images,
    digits,
    median_image_size,
    normalise,
    open_image,
    pixels,
    resize,
)
from tfkit.recipes.vit.model import VisionTransformer, patch_for
from tfkit.registry import register

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

READ_AHEAD_PIXELS = 1 << 22  # ~4 MB of uint8 pixels (×8 in float while cropping): a whole epoch of 8×8 digits


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
        self.settle("data.image_size", lambda: median_image_size(splits["train"], data))
        self.settle("model.patch", lambda: patch_for(data["image_size"]))
        self.settle_steps(len(splits["train"]))
        # validation and test images are held in memory; the training split's go into an Arrow table
        # (in datasets' cache when the images come from files), read a few batches at a time, so a
        # corpus of any size costs memory only for its labels
        self.train = decode_images(splits["train"], "train", data, self.labels)
        # once: with_format deep-copies. (pyarrow's Table.take would gather faster, but it first
        # concatenates the column's chunks, the whole memory-mapped column on every call.)
        self.train_table = self.train.with_format("arrow", columns=["pixels", "target"])
        self.train_rows = torch.from_numpy(np.flatnonzero(self.train_table["target"].to_numpy() >= 0))
        self.images, self.targets = {}, {}
        for split in ("validation", "test"):
            held = decode_images(splits[split], split, data, self.labels).filter(
                lambda target: target >= 0, input_columns="target"
            )
            self.images[split] = self._pixels(held.with_format("arrow")[:])
            self.targets[split] = torch.tensor(held["target"][:])

    def imitate_builtin_data(self) -> None:
        self.labels = [str(digit) for digit in range(10)]
        self.settle_builtin()

    def _require_columns(self, rows: datasets.Dataset, split: str) -> None:
        data = self.config["data"]
        require_columns(rows, split, [data["image_column"], data["label_column"]], "data.image_column and data.label_column")

    def _pixels(self, rows: pa.Table) -> Tensor:
        return pixels(rows, self.config["data"])

    def _resize(self, image: Image.Image) -> Tensor:
        return resize(image, self.config["data"]["image_size"])

    def _normalise(self, images: Tensor) -> Tensor:
        return normalise(images, self.config["data"])

    def save(self, run_dir: Path) -> None:
        runs.write_json(run_dir, "labels.json", self.labels)

    def load(self, run_dir: Path) -> None:
        self.labels = runs.read_json(run_dir, "labels.json")

    def build_model(self) -> nn.Module:
        m, data = self.config["model"], self.config["data"]
        return VisionTransformer(
            data["image_size"],
            data["channels"],
            len(self.labels),
            m["patch"],
            m["d_model"],
            m["depth"],
            m["heads"],
            m["d_ff"],
            m["dropout"],
            m["drop_path"],
            m["activation"],
            m["block"],
            m["norm_eps"],
            m["position"],
            m["attention"],
            m["feed_forward"],
            m["norm"],
        )

    # -- training ---------------------------------------------------------------------------------
    def train_batches(self, epoch: int) -> Iterator[Batch]:
        size, seed = self.config["train"]["batch_size"], self.config["seed"]
        crop, per_image, mix = augmentation(self.config["augment"], self.config["data"]["image_size"], len(self.labels))
        generator = seeded_generator(seed, epoch)
        rows = self.train_rows[torch.randperm(len(self.train_rows), generator=generator)]
        data = self.config["data"]
        # the epoch's boxes in one draw (every stored image has the configured size): drawn per
        # batch, they cost more than the cropping itself
        boxes = crop_boxes(crop, len(rows), data["image_size"], data["image_size"], generator)
        # read and crop several batches at once, up to READ_AHEAD_PIXELS: for small images, each
        # Arrow read and roi_align call costs more than the pixels it handles
        image_pixels = data["channels"] * data["image_size"] ** 2
        chunk = size * max(1, READ_AHEAD_PIXELS // (size * image_pixels))
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
        total = F.cross_entropy(
            logits.float(), batch["labels"], label_smoothing=self.config["train"]["label_smoothing"], reduction="sum"
        )
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
            draw_overlays(
                picture,
                [("rollout", flow[0, 1:].reshape(rows, cols))],
                "attention rollout, [CLS] → patches",
                out_dir / "rollout.png",
            )

        def page(weights: dict[str, np.ndarray]) -> dict:
            return {
                "panels": [
                    {
                        "kind": "image",
                        "title": "[CLS] → patches over the image, and rollout through all layers",
                        "pixels": picture.squeeze(-1) if picture.shape[-1] == 1 else picture,
                        "overlay": {"query": 0, "keys": [1, 1 + rows * cols], "grid": [rows, cols]},
                        "maps": {"rollout": rollout(weights)[0, 1:].reshape(rows, cols)},
                    }
                ]
            }

        return AttentionExample(
            run=lambda: model(self._normalise(image[None].to(device)), every_position=True),
            tokens={"tokens": tokens},
            axes=lambda name: ("tokens", "tokens"),
            draw=draw,
            page=page,
            meta={"grid": [rows, cols], "patch": model.patch, "image_size": list(image.shape[1:])},
        )

    # -- elsewhere: transformers folders and ONNX graphs (interop) ---------------------------------
    @classmethod
    def pretrained_config(cls, path: Path) -> dict[str, Any]:
        return interop.config_from_hf(path)

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        interop.load_hf_weights(model, path, len(self.labels))

    def export_hf(self, model: nn.Module, out: Path) -> None:
        interop.export_hf(self.config, self.labels, model, out)

    def onnx_graphs(self, model: nn.Module) -> list[Graph]:
        return interop.onnx_graphs(model, self.config["data"], self._normalise)

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        return interop.onnx_processing(self.config["data"], self.labels)

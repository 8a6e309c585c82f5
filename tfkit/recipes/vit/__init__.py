"""Image classification with the Vision Transformer (Dosovitskiy et al., 2021).

Reading order: ``data`` (the built-in 8×8 digits, image files decoded safely, rows of fixed-size
pixels), ``augment`` (batched random resized crops, flips, RandAugment, MixUp/CutMix), ``model``
(patches, [CLS], the positions, a registry encoder stack, the head), ``interop`` (transformers' ViT
folders and ONNX graphs), then ``recipe`` (``vit``: batches, loss, metrics, predict, inspect).
"""

from tfkit.recipes.vit.augment import crop_boxes, random_resized_crops
from tfkit.recipes.vit.data import digits, open_image
from tfkit.recipes.vit.model import VisionTransformer, patch_for
from tfkit.recipes.vit.recipe import ViT

__all__ = ["ViT", "VisionTransformer", "crop_boxes", "digits", "open_image", "patch_for", "random_resized_crops"]

"""The built-in digits as a folder of larger images, for ``tfkit train vit --data FOLDER``: the same
stratified 70/10/20 split, each 8×8 digit upscaled (bicubic) to SIZE × SIZE pixels and written as a
PNG under split/label/.

    python benchmarks/larger_digits.py /tmp/digits32 32
    tfkit train vit --data /tmp/digits32        # data.image_size and model.patch come from the images
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from tfkit.recipes.vit import digits


def write(out: Path, size: int) -> int:
    count = 0
    for split, rows in digits(0).items():
        names = rows.features["label"].names
        for i, row in enumerate(rows):
            folder = out / split / names[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            row["image"].resize((size, size), Image.BICUBIC).save(folder / f"{i}.png")
            count += 1
    return count


if __name__ == "__main__":
    out, size = Path(sys.argv[1]), int(sys.argv[2])
    print(f"{write(out, size)} images of {size}×{size} -> {out}")

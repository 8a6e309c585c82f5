"""The ViT recipe: patches, positions, learning on the built-in digits, predict, inspection, HF import."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from conftest import as_sets, one_error_line, quiet, recipe_config, straight_and_resumed_losses, tfkit
from tfkit import config as configs
from tfkit import registry
from tfkit import run as runs
from tfkit.errors import UsageError
from tfkit.inspect import attention_rollout
from tfkit.nn.blocks import DropPath, GatedFeedForward
from tfkit.nn.embeddings import PatchEmbedding
from tfkit.nn.position import resize_grid
from tfkit.recipes.vit import VisionTransformer, crop_boxes, open_image, random_resized_crops
from tfkit.train import start_training


def vit_config(*sets: str) -> dict:
    return recipe_config("vit", *sets)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> object:
    trainer = start_training(vit_config(), tmp_path_factory.mktemp("vit") / "run", torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    return trainer.run_dir


def test_patch_embedding_is_a_linear_map_of_each_patch():
    torch.manual_seed(0)
    embed = PatchEmbedding(3, 16, 4)
    images = torch.randn(2, 3, 8, 12)
    patches = images.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 2, 3, 4, 4)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 6, 3 * 16)  # row-major patches, (C, p, p) flattened
    expected = patches @ embed.proj.weight.reshape(16, -1).T + embed.proj.bias
    torch.testing.assert_close(embed(images), expected, atol=1e-5, rtol=1e-5)


def test_position_grid_resizing():
    table = torch.randn(16, 8)
    assert resize_grid(table, (4, 4), (4, 4)) is table
    constant = torch.ones(16, 8) * 3
    torch.testing.assert_close(resize_grid(constant, (4, 4), (6, 5)), torch.full((30, 8), 3.0))
    ramp = torch.arange(4.0).repeat(4)[:, None].expand(16, 2)  # value = column index
    resized = resize_grid(ramp, (4, 4), (4, 8)).reshape(4, 8, 2)
    assert torch.all(resized[:, 1:, 0] >= resized[:, :-1, 0] - 1e-5)  # still rises across columns
    assert torch.allclose(resized[0], resized[3])  # and is the same on every row


def test_vit_runs_at_another_image_size():
    model = VisionTransformer(8, 1, 10, 2, 32, 2, 4, 64, 0.0, 0.0, "gelu", "pre_ln", 1e-6).eval()
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert model(torch.randn(3, 1, 12, 16)).shape == (3, 10)
    with pytest.raises(UsageError, match="not a multiple"):
        VisionTransformer(9, 1, 10, 2, 32, 2, 4, 64, 0.0, 0.0, "gelu", "pre_ln", 1e-6)


@pytest.mark.parametrize("block", ["pre_ln", "post_ln"])
def test_cls_only_last_block_gives_the_full_models_logits_and_gradients(block):
    torch.manual_seed(0)
    model = VisionTransformer(8, 3, 10, 2, 32, 2, 4, 64, 0.0, 0.0, "gelu", block, 1e-6)
    images = torch.randn(3, 3, 8, 8)
    short = model(images)
    short_grads = torch.autograd.grad(short.square().sum(), list(model.parameters()))
    full = model(images, every_position=True)
    full_grads = torch.autograd.grad(full.square().sum(), list(model.parameters()))
    torch.testing.assert_close(short, full)
    for a, b in zip(short_grads, full_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("position, order_matters", [("learned", True), ("rotary", True), ("sinusoidal", True), ("none", False)])
def test_positions_tell_the_patches_apart_and_none_sees_a_bag_of_them(position, order_matters):
    torch.manual_seed(0)
    model = VisionTransformer(8, 1, 10, 2, 32, 2, 4, 64, 0.0, 0.0, "gelu", "pre_ln", 1e-6, position=position).eval()
    images = torch.randn(3, 1, 8, 8)
    moved = images.view(3, 1, 4, 2, 4, 2).permute(0, 1, 4, 3, 2, 5).reshape(3, 1, 8, 8)  # the grid of 2×2 patches transposed
    with torch.no_grad():
        logits = model(images)
        torch.testing.assert_close(logits, model(images, every_position=True))  # [CLS]-only last block or not
        assert torch.allclose(logits, model(moved), atol=1e-5) != order_matters
    assert ("position" in dict(model.named_parameters())) == (position == "learned")


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (
            ["model.position=rotary", "model.attention=relative_multi_head"],
            "model.position 'rotary' with model.attention 'relative_multi_head'",
        ),
        (
            ["model.position=rotary", "model.d_model=36"],
            "model.position 'rotary': rotary positions need an even size per head, got 9",
        ),
    ],
)
def test_positions_a_vit_cannot_place_are_refused_in_one_line(capsys, sets, fragment):
    code, _, err = tfkit(capsys, "train", "vit", *(a for item in sets for a in ("--set", item)), "--max-steps", "1")
    assert code == 2
    one_error_line(err, fragment)


@pytest.fixture(scope="module")
def rotary_run(tmp_path_factory) -> object:
    config = vit_config("model.position=rotary", "model.feed_forward=glu", "train.steps=100")
    trainer = start_training(config, tmp_path_factory.mktemp("vit-rotary") / "run", torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    return trainer.run_dir


def test_a_vit_with_rotary_positions_and_a_gated_feed_forward_learns_the_digits(rotary_run):
    recipe, model = runs.open_run(rotary_run)
    assert "position" not in dict(model.named_parameters()) and model.encoder.layers[0].self_attn.rotary is not None
    assert isinstance(model.encoder.layers[0].feed_forward, GatedFeedForward)
    recipe.prepare(rotary_run)
    assert recipe.evaluate(model, "test")["accuracy"] >= 85  # chance is 10; 100 steps gave 94-97 over seeds 0-2


def test_the_hf_export_of_a_rotary_vit_is_refused_in_one_line(capsys, rotary_run, tmp_path):
    code, _, err = tfkit(capsys, "export", str(rotary_run), str(tmp_path / "hf"), "--to", "hf")
    assert code == 2
    one_error_line(err, "model.position 'rotary' has no transformers ViT equivalent")


def test_random_resized_crops_of_a_batch():
    torch.manual_seed(0)

    def crops(images: torch.Tensor, crop: v2.RandomResizedCrop) -> torch.Tensor:
        return random_resized_crops(images, crop_boxes(crop, len(images), 8, 8), crop.size)

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(crops(images, v2.RandomResizedCrop(8, scale=(1.0, 1.0))), images)  # whole image
    smaller = crops(images, v2.RandomResizedCrop(8, scale=(0.2, 0.5)))
    assert smaller.shape == images.shape and smaller.dtype == torch.uint8
    # a constant image stays constant whatever the box: only the pixels inside and around it matter
    flat = torch.full((4, 1, 8, 8), 77, dtype=torch.uint8)
    assert (crops(flat, v2.RandomResizedCrop(8, scale=(0.2, 0.5))) == 77).all()
    # each image gets its own box: a quarter-size box of a left-right ramp starts at different columns
    ramp = torch.arange(8, dtype=torch.uint8).mul(30).expand(16, 1, 8, 8).contiguous()
    firsts = crops(ramp, v2.RandomResizedCrop(8, scale=(0.25, 0.25), ratio=(1.0, 1.0)))[:, 0, 0, 0]
    assert len(set(firsts.tolist())) > 1
    # resized as well as cut: 8×8 images to 4×4
    assert random_resized_crops(images, crop_boxes(v2.RandomResizedCrop(4), 6, 8, 8), (4, 4)).shape == (6, 3, 4, 4)


@pytest.mark.parametrize("size,scale,ratio", [((8, 8), (0.6, 1.0), (3 / 4, 4 / 3)), ((8, 10), (0.7, 1.0), (0.5, 1.0))])
def test_crop_boxes_follow_torchvisions_distribution(size, scale, ratio):
    """Drawn all at once, the boxes have make_params' distribution: sizes, positions, and how often the
    central fallback is taken (often for a wide image whose boxes must not be wide)."""
    height, width = size
    crop, count = v2.RandomResizedCrop(8, scale=scale, ratio=ratio), 4000
    torch.manual_seed(0)
    ours = crop_boxes(crop, count, height, width)
    image = torch.zeros(1, height, width)
    theirs = []
    for _ in range(count):
        box = crop.make_params([image])
        theirs.append([box["left"], box["top"], box["left"] + box["width"], box["top"] + box["height"]])
    theirs = torch.tensor(theirs, dtype=torch.float32)
    assert ((ours >= 0) & (ours[:, [2, 3, 2, 3]] <= torch.tensor([width, height, width, height]))).all()
    assert (ours[:, 2] > ours[:, 0]).all() and (ours[:, 3] > ours[:, 1]).all()
    central = torch.tensor([(width - 8) // 2, 0, (width - 8) // 2 + 8, 8.0])  # the fallback of the wide case
    for features in (
        lambda b: b[:, 2] - b[:, 0],
        lambda b: b[:, 3] - b[:, 1],
        lambda b: b[:, 0],
        lambda b: b[:, 1],
        lambda b: (b == central).all(1).float(),
    ):
        a, b = features(ours), features(theirs)
        error = (a.var() / count + b.var() / count).sqrt()
        assert abs(a.mean() - b.mean()) < 4 * error + 1e-6


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    drop = DropPath(0.25)
    x = torch.ones(4000, 3, 5)
    y = drop(x)
    per_sample = y.flatten(1)
    kept = per_sample[per_sample != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # all or nothing per sample
    assert abs(y.mean().item() - 1.0) < 0.05
    assert torch.equal(drop.eval()(x), x)


def test_rollout_rows_sum_to_one_and_identity_attention_rolls_out_to_identity():
    rng = np.random.default_rng(0)
    layers = [rng.random((3, 5, 5)) for _ in range(4)]
    layers = [w / w.sum(-1, keepdims=True) for w in layers]
    np.testing.assert_allclose(attention_rollout(layers).sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(attention_rollout([np.stack([np.eye(5)] * 2)] * 3), np.eye(5))


def test_tiny_vit_learns_the_digits(vit_run):
    records = [r for r in runs.read_metrics(vit_run) if "loss" in r]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    recipe, model = runs.open_run(vit_run)
    recipe.prepare(vit_run)
    assert recipe.evaluate(model, "test")["accuracy"] >= 90


def digit_images(run, count: int) -> tuple[list[np.ndarray], list[str]]:
    recipe, _ = runs.open_run(run)
    recipe.prepare(run)
    images = recipe.images["test"][:count, 0].numpy()
    return list(images), [recipe.labels[int(t)] for t in recipe.targets["test"][:count]]


def test_predict_on_png_jpeg_grayscale_rgba_and_a_corrupt_file(capsys, vit_run, tmp_path):
    images, labels = digit_images(vit_run, 4)
    big = [Image.fromarray(img).resize((32, 32), Image.NEAREST) for img in images]
    files = [tmp_path / "gray.png", tmp_path / "rgb.jpg", tmp_path / "rgba.png", tmp_path / "palette.gif"]
    big[0].save(files[0])
    big[1].convert("RGB").save(files[1], quality=95)
    rgba = big[2].convert("RGBA")
    rgba.putalpha(255)
    rgba.save(files[2])
    big[3].convert("P").save(files[3])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    code, out, err = tfkit(capsys, "predict", str(vit_run), str(files[0]), str(corrupt), *map(str, files[1:]), "--top-k", "2")
    assert code == 2
    one_error_line(err, "corrupt.png: not a readable image")
    lines = [line.split("\t") for line in out.splitlines()]
    assert [line[0] for line in lines] == list(map(str, files))
    assert all(len(line) == 3 for line in lines)  # path and two labels
    predicted = [line[1].split()[0] for line in lines]
    assert sum(p == t for p, t in zip(predicted, labels)) >= 3
    assert all(0 <= float(line[1].split()[1]) <= 1 for line in lines)


def bomb_png(path, width: int, height: int) -> None:
    """A PNG header that claims ``width`` × ``height`` pixels, without the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_an_oversized_image_or_any_failure_on_one_file_does_not_cost_the_others(capsys, vit_run, tmp_path, monkeypatch):
    images, _ = digit_images(vit_run, 3)
    files = [tmp_path / f"{name}.png" for name in ("first", "bomb", "big", "boom", "last")]
    for path, img in zip([files[0], files[4]], images):
        Image.fromarray(img).save(path)
    bomb_png(files[1], 30000, 30000)  # beyond PIL's own limit, which it enforces at open
    bomb_png(files[2], 10000, 9000)  # beyond tfkit's, which PIL would only warn about
    Image.fromarray(images[2]).save(files[3])
    from tfkit.recipes.vit import ViT

    original = ViT._predict_image

    def fails_on_boom(self, model, path, out, top_k):
        if path.name == "boom.png":
            raise RuntimeError("the decoder's own failure\nwith more lines")
        return original(self, model, path, out, top_k)

    monkeypatch.setattr(ViT, "_predict_image", fails_on_boom)
    code, out, err = tfkit(capsys, "predict", str(vit_run), *map(str, files))
    assert code == 2 and "Traceback" not in err
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(files[0]), str(files[4])]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {files[1]}: the image has more than the 89 million pixels tfkit decodes (scale it down first)",
        f"error: {files[2]}: the image has more than the 89 million pixels tfkit decodes (scale it down first)",
        f"error: {files[3]}: RuntimeError: the decoder's own failure",
    ]
    code, out, err = tfkit(capsys, "predict", str(vit_run), str(tmp_path), "--debug")  # a folder; tracebacks with --debug
    assert code == 2 and len(out.splitlines()) == 2 and "3 of 5 images could not be read" in err
    assert "Traceback" in err and "fails_on_boom" in err


def test_a_16_bit_grey_image_keeps_its_shades(tmp_path):
    ramp = np.arange(256, dtype=np.uint16).repeat(2).reshape(2, 256, order="F") * 257  # 0 … 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    for channels in (1, 3):
        pixels = np.asarray(open_image(tmp_path / "ramp.png", channels=channels))
        assert np.array_equal(pixels.reshape(2, 256, -1)[..., 0], np.arange(256).repeat(2).reshape(2, 256, order="F"))


def test_predict_on_a_folder_and_on_an_empty_folder(capsys, vit_run, tmp_path):
    images, _ = digit_images(vit_run, 3)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    code, out, _ = tfkit(capsys, "predict", str(vit_run), str(tmp_path))
    assert code == 0 and len(out.splitlines()) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = tfkit(capsys, "predict", str(vit_run), str(empty))
    assert code == 2
    one_error_line(err, "the folder holds no images")
    code, _, err = tfkit(capsys, "predict", str(vit_run), str(tmp_path / "0.png"), "--beam", "2")
    assert code == 2
    one_error_line(err, "--beam does not apply to this recipe")


def test_inspect_attention_on_an_image(capsys, vit_run, tmp_path):
    images, _ = digit_images(vit_run, 1)
    Image.fromarray(images[0]).save(tmp_path / "digit.png")
    out_dir = tmp_path / "attention"
    code, out, err = tfkit(capsys, "inspect-attention", str(vit_run), str(tmp_path / "digit.png"), "--out", str(out_dir))
    assert code == 0, err
    weights = np.load(out_dir / "attention.npz")
    assert set(weights.files) == {"encoder.layers.0.self_attn", "encoder.layers.1.self_attn"}
    assert weights["encoder.layers.0.self_attn"].shape == (4, 5, 5)  # heads, [CLS] + 2×2 patches
    described = json.loads((out_dir / "tokens.json").read_text())
    assert described["grid"] == [2, 2] and described["axes"]["tokens"][0] == "[CLS]"
    rollout = np.load(out_dir / "rollout.npy")
    assert rollout.shape == (5, 5)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-5)
    assert {p.name for p in out_dir.glob("*.png")} == {
        "encoder.layers.0.self_attn.png",
        "encoder.layers.1.self_attn.png",
        "rollout.png",
    }
    code, _, err = tfkit(capsys, "inspect-attention", str(vit_run), str(tmp_path / "none.png"))
    assert code == 2
    one_error_line(err, "none.png: no such file")


def write_image_folder(root, images, labels, corrupt: bool = False):
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").save(folder / f"{i}.png")
    if corrupt:
        (root / f"class_{labels[0]}" / "broken.png").write_bytes(b"not an image at all")


def test_user_image_folder_and_csv_train_end_to_end(capsys, vit_run, tmp_path):
    images, labels = digit_images(vit_run, 60)
    folder = tmp_path / "folder"
    write_image_folder(folder, images, labels, corrupt=True)
    small = [
        "--max-steps",
        "2",
        *as_sets(
            [
                "train.batch_size=8",
                "data.image_size=16",
                "model.patch=4",
                "data.channels=3",
                "model.d_model=16",
                "model.d_ff=32",
                "model.depth=1",
            ]
        ),
    ]
    code, out, err = tfkit(capsys, "train", "vit", "--data", str(folder), "--out", str(tmp_path / "run1"), *small)
    assert code == 0, err
    assert (
        "skipped 1 of the 55 images in the train data" in err and "broken.png: not a readable image" in err
    )  # 61 less the carved splits
    assert json.loads((tmp_path / "run1" / "labels.json").read_text()) == sorted({f"class_{label}" for label in labels})

    listing = tmp_path / "images.csv"
    listing.write_text("file,digit\n" + "".join(f"folder/class_{label}/{i}.png,{label}\n" for i, label in enumerate(labels)))
    columns = ["--set", "data.image_column=file", "--set", "data.label_column=digit"]
    code, out, err = tfkit(capsys, "train", "vit", "--data", str(listing), "--out", str(tmp_path / "run2"), *small, *columns)
    assert code == 0, err
    # the training images live in an Arrow file in datasets' cache, read batch by batch, not in memory
    recipe = registry.get("recipe", "vit")(runs.read_config(tmp_path / "run2"))
    recipe.prepare(tmp_path / "run2")
    assert recipe.train.cache_files and len(recipe.train_rows) > 0
    assert next(recipe.train_batches(0))["images"].shape[1:] == (recipe.config["data"]["channels"], 16, 16)
    code, _, err = tfkit(capsys, "train", "vit", "--data", str(listing), "--out", str(tmp_path / "run3"), *small)
    assert code == 2
    one_error_line(err, "has no column 'image'")


def test_a_folder_with_no_images_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "readme.txt").write_text("no pictures here")
    code, _, err = tfkit(capsys, "train", "vit", "--data", str(tmp_path), "--max-steps", "1")
    assert code == 2
    one_error_line(err, "nor images in one subfolder per class")


@pytest.mark.parametrize(
    "item, fragment",
    [("data.mean=[0.5, 0.5]", "data.mean has 2 values"), ("augment.crop_scale=[1.0, 0.5]", "augment.crop_scale must be")],
)
def test_normalisation_and_crop_settings_that_cannot_apply_are_clear_errors(capsys, item, fragment):
    code, _, err = tfkit(capsys, "train", "vit", "--set", item, "--max-steps", "1")
    assert code == 2
    one_error_line(err, fragment)


def test_hugging_face_vit_imports_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf_model = transformers.ViTForImageClassification(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)

    recipe_cls = registry.get("recipe", "vit")
    defaults = configs.merge(recipe_cls.default_config(), {**recipe_cls.pretrained_config(tmp_path / "hf"), "init": "x"})
    recipe = recipe_cls(defaults)
    recipe.labels = [str(i) for i in range(10)]
    model = recipe.build_model()
    recipe.load_pretrained(model, tmp_path / "hf")
    model.eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), hf_model(pixel_values=images).logits, atol=1e-5, rtol=1e-5)
        bigger = torch.randn(2, 3, 24, 24)
        theirs = hf_model(pixel_values=bigger, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(model(bigger), theirs, atol=1e-4, rtol=1e-4)


def test_init_from_a_folder_that_is_not_a_vit(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = tfkit(capsys, "train", "vit", "--init", str(tmp_path))
    assert code == 2
    one_error_line(err, "describes a 'bert' model, not a ViT")
    code, _, err = tfkit(capsys, "train", "translation", "--init", str(tmp_path))
    assert code == 2
    one_error_line(err, "describes a 'bert' model, not Marian")
    code, _, err = tfkit(capsys, "train", "conformer", "--init", str(tmp_path))
    assert code == 2
    one_error_line(err, "recipe 'conformer' cannot start from pretrained weights (--init)")


def test_augmented_vit_resumes_exactly(tmp_path):
    """RandAugment, MixUp and CutMix draw random numbers too: a resumed run must replay them."""
    config = vit_config(
        "train.steps=6",
        "train.log_every=1",
        "train.batch_size=16",
        "augment.crop_scale=[0.5, 1.0]",
        "augment.randaugment=true",
        "augment.mixup=0.4",
        "augment.cutmix=0.4",
        "model.drop_path=0.2",
    )
    straight, resumed = straight_and_resumed_losses(config, tmp_path)
    assert straight == resumed and len(straight) == 6


def test_compiled_training_steps_match_eager_ones(tmp_path):
    """--compile runs the training step through torch.compile; losses and saved weights stay the same."""
    from safetensors.torch import load_file

    losses, weights = [], []
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        config = vit_config("train.steps=3", "train.log_every=1", "model.depth=1", f"train.compile={compiled}")
        trainer = start_training(config, tmp_path / name, torch.device("cpu"), console=quiet())
        trainer.fit(progress=False)
        assert (trainer.step_model is not trainer.model) == (compiled == "true")
        losses.append([r["loss"] for r in runs.read_metrics(tmp_path / name) if "lr" in r])  # training records
        weights.append(load_file(str(runs.last_checkpoint(tmp_path / name) / runs.WEIGHTS)))
    assert len(losses[1]) == 3 and np.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert weights[0].keys() == weights[1].keys()  # no "_orig_mod." prefixes in the checkpoint
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-5)

"""Presets, and the sizes chosen from the user's data (issue #25): what is chosen, that it is said and
recorded, that a value the user set is kept, and that the built-in data keeps its own sizes."""

import copy
import random

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import one_error_line, tfkit
from tfkit import config as configs
from tfkit import registry
from tfkit import run as runs
from tfkit.data import choose_vocab_size, length_limit, train_bpe
from tfkit.recipe import MIN_STEPS
from tfkit.recipes.vit import patch_for

TINY_TRANSLATION = [
    "model.d_model=32",
    "model.d_ff=64",
    "model.encoder.layers=1",
    "model.decoder.layers=1",
    "train.batch_size=16",
    "train.eval_every=0",
    "decode.beam=1",
]


def sets(*items: str) -> list[str]:
    return [f"--set={item}" for item in items]


def chosen_comments(run) -> dict[str, str]:
    """The `# chosen from the data:` header of config.yaml, as {key: value and why}."""
    lines = (run / runs.CONFIG).read_text().splitlines()
    assert lines[0] == "# chosen from the data:", lines[:3]
    header = [line[4:] for line in lines[1:] if line.startswith("#   ")]
    return dict(line.split(": ", 1) for line in header)


# -- presets ----------------------------------------------------------------------------------------
def test_every_recipe_lists_its_presets_with_parameter_counts(capsys):
    code, out, err = tfkit(capsys, "recipes")
    assert code == 0, err
    for name in registry.names("recipe"):
        recipe_cls = registry.get("recipe", name)
        assert recipe_cls.presets()[:3] == ["tiny", "small", "base"], name
        counts = [recipe_cls.preset_parameters(p) for p in ("tiny", "small", "base")]
        assert counts == sorted(counts) and len(set(counts)) == 3, (name, counts)
    assert "tiny" in out and "base" in out


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("vit", {"data.image_size": 8, "model.patch": 2, "train.steps": 4000}),
        ("forecast", {"data.context": 104, "data.horizon": 26, "data.test_size": 312, "model.patch": 8, "train.steps": 1500}),
    ],
)
def test_the_built_in_data_keeps_its_sizes_and_the_preset_count_is_the_models(name, sizes):
    recipe_cls = registry.get("recipe", name)
    recipe = recipe_cls(recipe_cls.default_config())
    recipe.prepare()
    for key, value in sizes.items():
        section, key = key.split(".")
        assert recipe.config[section][key] == value, key
    follows = {"baselines.steps": "(the Transformer's train.steps)"}  # forecast's peers get the same budget
    assert all(why.endswith(follows.get(key, "(the built-in data's)")) for key, why in recipe.chosen.items())
    assert sum(p.numel() for p in recipe.build_model().parameters()) == recipe_cls.preset_parameters("tiny")


def test_a_preset_sets_the_sizes_and_is_recorded(capsys, tmp_path):
    run = tmp_path / "small"
    code, _, err = tfkit(
        capsys, "train", "forecast", "--preset", "small", "--max-steps", "0", "--out", str(run), "--set", "baselines.steps=1"
    )
    assert code == 0, err
    config = runs.read_config(run)
    assert config["preset"] == "small" and config["model"]["d_model"] == 128 and config["model"]["layers"] == 3
    code, _, err = tfkit(capsys, "train", "forecast", "--set", "preset=base", "--max-steps", "0")
    one_error_line(err, "choose a preset with --preset base")
    code, _, err = tfkit(capsys, "train", "forecast", "--preset", "huge")
    one_error_line(err, "unknown preset 'huge' for forecast (valid: tiny, small, base)")
    code, _, err = tfkit(capsys, "train", "--resume", str(run), "--preset", "base")
    one_error_line(err, "--resume continues a run with its own config")


# -- the rules --------------------------------------------------------------------------------------
def test_the_vocabulary_grows_with_the_text_it_is_measured_on():
    words = [f"{a}{b}" for a in ("ka", "to", "mi", "re", "su", "no", "ha", "ye") for b in ("n", "ri", "sa", "tol", "mek", "ul")]
    rng = random.Random(0)
    fit = lambda texts, size: train_bpe(texts, size, ["<pad>"])  # noqa: E731

    def corpus(sentences: int) -> list[str]:
        return [" ".join(rng.choice(words) + rng.choice(words) for _ in range(8)) for _ in range(sentences)]

    small, _ = choose_vocab_size(corpus(300), fit)
    large, why = choose_vocab_size(corpus(30_000), fit)
    assert small <= 500 < large, (small, large)
    assert "median piece occurs 10+ times" in why
    # measured on a tenth of the text, a piece needs a tenth of the count
    assert abs(choose_vocab_size(corpus(3_000), fit, total=30_000)[0] - large) < 0.05 * large


def test_length_limits_patches_and_steps():
    assert length_limit(range(1, 1001))[0] == 1000  # the 99.5th percentile, 995.5, rounded up to 8s
    assert length_limit([3] * 100)[0] == 8
    assert [patch_for(size)[0] for size in (8, 28, 32, 64, 224)] == [2, 2, 4, 8, 16]
    recipe_cls = registry.get("recipe", "translation")
    user_data = configs.merge(recipe_cls.default_config(), {"data": {"name": "pairs.tsv"}})
    recipe = recipe_cls(copy.deepcopy(user_data))
    recipe.settle_steps(100_000)
    assert recipe.config["train"]["steps"] == 10 * 1563
    recipe = recipe_cls(copy.deepcopy(user_data))
    recipe.settle_steps(1000)
    assert recipe.config["train"]["steps"] == MIN_STEPS
    recipe = recipe_cls(recipe_cls.default_config())  # the built-in corpus: its own steps
    recipe.settle_steps(100_000)
    assert recipe.config["train"]["steps"] == 3000


# -- each recipe on the user's data -----------------------------------------------------------------
def test_translation_sizes_are_chosen_said_recorded_and_kept_on_resume(capsys, tmp_path):
    from num2words import num2words

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("source\ttarget\n" + "".join(f"{num2words(n)}\t{num2words(n, lang='fr')}\n" for n in range(1, 600)))
    run = tmp_path / "run"
    code, _, err = tfkit(
        capsys, "train", "translation", "--data", str(pairs), "--max-steps", "2", "--out", str(run), *sets(*TINY_TRANSLATION)
    )
    assert code == 0, err
    assert "data.vocab_size = " in err and "data.max_tokens = " in err
    config, chosen = runs.read_config(run), chosen_comments(run)
    assert set(chosen) == {"data.vocab_size", "data.max_tokens"}  # --max-steps set train.steps
    # a few hundred number words hold fewer than 500 pieces to learn: all of them
    assert 200 < config["data"]["vocab_size"] == runs.read_tokenizer(run).get_vocab_size() < 500
    assert isinstance(config["data"]["max_tokens"], int) and chosen["data.max_tokens"].startswith(
        f"{config['data']['max_tokens']} (the 99.5th"
    )
    code, _, err = tfkit(capsys, "train", "--resume", str(run), "--max-steps", "3")
    assert code == 0, err
    assert chosen_comments(run) == chosen and "data.vocab_size =" not in err

    kept = tmp_path / "kept"
    code, _, err = tfkit(
        capsys,
        "train",
        "translation",
        "--data",
        str(pairs),
        "--max-steps",
        "1",
        "--out",
        str(kept),
        *sets(*TINY_TRANSLATION, "data.vocab_size=120", "data.max_tokens=20"),
    )
    assert code == 0, err
    assert runs.read_config(kept)["data"]["vocab_size"] == 120 and "vocab_size =" not in err
    assert not (kept / runs.CONFIG).read_text().startswith("#")


def digit_folder(root, size: int, per_class: int = 12):
    """The built-in digits upscaled to size × size PNGs, one folder per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == digit][:per_class]):
            pixels = (image * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(root / str(digit) / f"{i}.png")
    return root


def test_vit_takes_its_image_size_and_patch_from_the_images(capsys, tmp_path):
    folder = digit_folder(tmp_path / "digits32", 32)
    run = tmp_path / "run"
    small = sets("model.d_model=16", "model.d_ff=32", "model.depth=1", "train.batch_size=16", "train.eval_every=0")
    code, _, err = tfkit(capsys, "train", "vit", "--data", str(folder), "--max-steps", "2", "--out", str(run), *small)
    assert code == 0, err
    config, chosen = runs.read_config(run), chosen_comments(run)
    assert (config["data"]["image_size"], config["model"]["patch"]) == (32, 4)
    assert "training images is 32 px" in chosen["data.image_size"] and "4×4" not in chosen["model.patch"]
    _, model = runs.open_run(run)
    assert model.grid == (8, 8)

    large = digit_folder(tmp_path / "digits100", 100, per_class=3)
    code, _, err = tfkit(
        capsys, "train", "vit", "--data", str(large), "--max-steps", "1", "--out", str(tmp_path / "capped"), *small
    )
    assert code == 0, err
    assert runs.read_config(tmp_path / "capped")["data"]["image_size"] == 32
    assert "capped at data.max_image_size 32" in chosen_comments(tmp_path / "capped")["data.image_size"]


def test_forecast_sizes_follow_the_season_and_the_built_in_macro_trains_as_it_is(capsys, tmp_path):
    months = 240
    t = np.arange(months)
    rng = np.random.default_rng(0)
    frame = {
        "date": [f"{2000 + m // 12}-{m % 12 + 1:02d}-01" for m in t],
        "sales": 100 + 0.2 * t + 10 * np.sin(2 * np.pi * t / 12) + rng.normal(size=months),
    }
    path = tmp_path / "monthly.csv"
    path.write_text("date,sales\n" + "".join(f"{d},{v:.3f}\n" for d, v in zip(frame["date"], frame["sales"])))
    run = tmp_path / "run"
    tiny = sets("model.d_model=16", "model.d_ff=32", "model.layers=1", "train.eval_every=0", "baselines.steps=1")
    code, _, err = tfkit(capsys, "train", "forecast", "--data", str(path), "--max-steps", "2", "--out", str(run), *tiny)
    assert code == 0, err
    data, model = runs.read_config(run)["data"], runs.read_config(run)["model"]
    assert (data["horizon"], data["context"], data["validation_size"], data["test_size"], data["origin_stride"]) == (
        12,
        48,
        24,
        48,
        2,
    )
    assert (model["patch"], model["stride"]) == (4, 4)
    assert "one season of 12 steps" in chosen_comments(run)["data.horizon"]

    code, _, err = tfkit(
        capsys, "train", "forecast", "--data", "macro", "--max-steps", "2", "--out", str(tmp_path / "macro"), *tiny
    )
    assert code == 0, err
    config = runs.read_config(tmp_path / "macro")
    assert (config["data"]["context"], config["data"]["horizon"], config["model"]["patch"]) == (16, 4, 4)
    assert "the built-in data's" in chosen_comments(tmp_path / "macro")["data.horizon"]


def test_the_steps_are_chosen_from_the_data_when_not_set(tmp_path):
    from conftest import quiet
    from tfkit.train import start_training

    folder = digit_folder(tmp_path / "digits", 8, per_class=3)
    recipe_cls = registry.get("recipe", "vit")
    config = yaml.safe_load(yaml.safe_dump(recipe_cls.default_config()))
    config["data"]["name"] = str(folder)
    config["train"].update(epochs=2, eval_every=0)
    trainer = start_training(config, tmp_path / "run", torch.device("cpu"), console=quiet())
    assert trainer.recipe.config["train"]["steps"] == MIN_STEPS
    assert "2 epochs of " in trainer.recipe.chosen["train.steps"]

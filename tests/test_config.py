from __future__ import annotations

import re

import pytest
import yaml

from tfkit import config as configs
from tfkit import registry
from tfkit.errors import UsageError

DEFAULTS = registry.get("recipe", "translation").default_config()


def resolve(*sets: str, config_file=None) -> dict:
    return configs.resolve(DEFAULTS, config_file, list(sets))


def test_dotted_overrides_reach_nested_keys_with_their_types():
    config = resolve("model.encoder.layers=5", "train.lr=1e-3", "train.betas=[0.8, 0.9]", "data.target_lang=fr")
    assert config["model"]["encoder"]["layers"] == 5
    assert config["train"]["lr"] == 0.001 and isinstance(config["train"]["lr"], float)
    assert config["train"]["betas"] == [0.8, 0.9]
    assert config["data"]["target_lang"] == "fr"
    assert DEFAULTS["model"]["encoder"]["layers"] == 3  # the defaults are not mutated


def test_an_integer_is_accepted_where_a_float_is_expected():
    assert resolve("train.lr=1")["train"]["lr"] == 1.0


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(UsageError, match=r"unknown config key 'model.dmodel' \(valid keys under 'model': d_model, heads"):
        resolve("model.dmodel=256")
    with pytest.raises(UsageError, match="valid keys at the top level: recipe, preset, seed, init, data"):
        resolve("optimiser=adam")


@pytest.mark.parametrize(
    "item, message",
    [
        ("model.d_model=big", "'model.d_model' expects an integer, got 'big'"),
        ("train.lr=fast", "'train.lr' expects a number"),
        ("model.encoder.layers=true", "expects an integer, got True"),
        ("train.betas=0.9", "expects a list"),
        ("model=3", "is a section"),
    ],
)
def test_wrong_type_names_the_key(item, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(item)


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.batch_size=0", "'train.batch_size' must be at least 1, got 0"),
        ("model.decoder.layers=-2", "'model.decoder.layers' must be at least 1, got -2"),
        ("decode.beam=0", "'decode.beam' must be at least 1"),
        ("train.warmup=-1", "'train.warmup' must be at least 0 (0 turns it off), got -1"),
        ("seed=-1", "'seed' must be at least 0"),
        ("train.lr=0", "'train.lr' must be greater than 0, got 0.0"),
        ("model.dropout=1.5", "'model.dropout' must be at least 0 and below 1, got 1.5"),
        ("train.label_smoothing=1", "'train.label_smoothing' must be at least 0 and below 1"),
        ("train.betas=[0.9, 1.2]", "'train.betas' must be at least 0 and below 1, got [0.9, 1.2]"),
    ],
)
def test_a_number_out_of_its_range_names_the_key(item, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        resolve(item)


def test_zero_is_accepted_where_it_turns_something_off():
    config = resolve("train.warmup=0", "train.eval_every=0", "train.clip_grad_norm=0", "model.dropout=0", "seed=0")
    assert config["train"]["warmup"] == 0 and config["model"]["dropout"] == 0.0


@pytest.mark.parametrize("recipe", registry.names("recipe"))
def test_every_default_config_is_in_range(recipe):
    configs.check_values(registry.get("recipe", recipe).default_config())


@pytest.mark.parametrize("item", ["model.d_model", "=3", "model..d_model=3", ".x=1"])
def test_malformed_set_is_rejected(item):
    with pytest.raises(UsageError, match="malformed --set"):
        resolve(item)


def test_unknown_component_fails_at_config_time():
    with pytest.raises(
        UsageError, match=r"config key 'model.position': unknown position 'alibi' \(valid: learned, none, rotary, sinusoidal\)"
    ):
        resolve("model.position=alibi")
    with pytest.raises(UsageError, match="config key 'model.encoder.block': unknown block"):
        resolve("model.encoder.block=nope")


def test_config_file_overrides_then_sets(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  d_model: 64\ntrain:\n  steps: 10\n")
    config = resolve("train.steps=20", config_file=path)
    assert config["model"]["d_model"] == 64 and config["train"]["steps"] == 20


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), ("a: [1,\n", "not valid YAML"), ("- 1\n- 2\n", "must hold a mapping")],
)
def test_bad_config_files(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        resolve(config_file=path)


def test_dump_round_trips():
    config = resolve("train.lr=0.01")
    assert configs.merge(DEFAULTS, yaml.safe_load(configs.dump(config))) == config

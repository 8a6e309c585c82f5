"""The command line as a user meets it: outputs, run directories, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, one_error_line, tfkit
from tfkit import registry
from tfkit import run as runs


@pytest.mark.parametrize(
    "command", ["train", "predict", "evaluate", "export", "inspect-attention", "report", "recipes", "components"]
)
def test_every_command_has_help_with_an_example(capsys, command):
    code, out, _ = tfkit(capsys, command, "--help")
    assert code == 0 and "Example: tfkit " in out


def test_recipes_and_components_tables(capsys):
    code, out, _ = tfkit(capsys, "recipes")
    assert code == 0 and "translation" in out and "Encoder-decoder" in out
    code, out, _ = tfkit(capsys, "components")
    rows = set(re.findall(r"^│ (\w+)\s*│ (\w+)\s*│", out, re.M))  # (kind, name) of every row; wrapped summaries add none
    assert rows == {(kind, name) for kind in registry.kinds() if kind != "recipe" for name in registry.names(kind)}
    assert ("attention", "multi_head") in rows and ("block", "post_ln_decoder") in rows


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["train", "nmt"],
            "unknown recipe 'nmt' (valid: bert-finetune, bert-pretrain, causal-lm, conformer, forecast, translation, vit)",
        ),
        (["train", "translation", "--set", "model.width=3"], "unknown config key 'model.width'"),
        (["train", "translation", "--set", "model.d_model"], "malformed --set 'model.d_model'"),
        (["train", "translation", "--set", "model.heads=four"], "'model.heads' expects an integer"),
        (["train", "translation", "--set", "model.position=rope"], "unknown position 'rope'"),
        (["train", "translation", "--device", "tpu"], "unknown device 'tpu'"),
        (["train"], "name a recipe"),
        (["evaluate", "no/such/run"], "run directory no/such/run does not exist"),
        (["predict", "no/such/run", "x.txt"], "does not exist"),
        (["inspect-attention", "no/such/run", "one"], "does not exist"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(capsys, args, fragment):
    code, _, err = tfkit(capsys, *args)
    assert code == 2
    one_error_line(err, fragment)


def test_missing_and_unreadable_data(capsys, tmp_path):
    code, _, err = tfkit(
        capsys,
        "train",
        "translation",
        "--data",
        str(tmp_path / "none.tsv"),
        *sum((["--set", s] for s in TINY["translation"]), []),
    )
    assert code == 2
    one_error_line(err, "does not exist")
    bad = tmp_path / "pairs.tsv"
    bad.write_text("src\ttgt\n" + "ein\tone\n" * 50)
    code, _, err = tfkit(
        capsys, "train", "translation", "--data", str(bad), *sum((["--set", s] for s in TINY["translation"]), [])
    )
    assert code == 2
    one_error_line(err, "has no column 'source'")


def test_run_directory_with_a_missing_file(capsys, trained_run, tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    (run / runs.CONFIG).write_bytes((trained_run / runs.CONFIG).read_bytes())
    code, _, err = tfkit(capsys, "evaluate", str(run))
    assert code == 2
    one_error_line(err, "has no tokenizer.json")
    (run / runs.TOKENIZER).write_bytes((trained_run / runs.TOKENIZER).read_bytes())
    code, _, err = tfkit(capsys, "evaluate", str(run))
    assert code == 2
    one_error_line(err, "has no checkpoint yet (it was stopped before its first save: continue it with tfkit train --resume")


def held_out(run, count: int) -> tuple[list[str], list[str]]:
    """Test-split sources of a run and the translations its model gives them with greedy search."""
    recipe, model = runs.open_run(run)
    recipe.prepare(run)
    sources = [src for src, _ in recipe.pairs["test"][:count]]
    translations = recipe.translate(model, recipe.sources["test"][:count], beam=1)
    return sources, [translations[i] for i in range(count)]


def test_predict_reports_bad_files_and_translates_the_rest(capsys, trained_run, tmp_path):
    sources, expected = held_out(trained_run, 2)
    good = tmp_path / "good.txt"
    good.write_text(f"{sources[0]}\n\n{sources[1]}\n")
    empty, latin1, missing = tmp_path / "empty.txt", tmp_path / "latin1.txt", tmp_path / "missing.txt"
    empty.write_text("")
    latin1.write_bytes("fünf\n".encode("latin-1"))
    code, out, err = tfkit(capsys, "predict", str(trained_run), str(missing), str(empty), str(latin1), str(good), "--beam", "1")
    assert code == 2
    assert out.splitlines() == [expected[0], "", expected[1]]  # one line per input line, the empty one kept
    assert "missing.txt: no such file" in err and "empty.txt: the file is empty" in err and "latin1.txt: not UTF-8" in err
    assert "good.txt:2: empty line" in err and "Traceback" not in err


def test_predict_warns_of_a_line_longer_than_max_tokens(capsys, trained_run, tmp_path):
    source = tmp_path / "long.txt"
    source.write_text("eins\n" + " ".join(["neunhundertneunundneunzig"] * 60) + "\n")
    code, out, err = tfkit(capsys, "predict", str(trained_run), str(source), "--beam", "1")
    assert code == 0 and len(out.splitlines()) == 2
    limit = runs.read_config(trained_run)["data"]["max_tokens"]
    assert "long.txt:2: " in err and f"tokens, more than data.max_tokens {limit}; only the first {limit} are translated" in err
    assert "long.txt:1" not in err


def test_predict_writes_to_out(capsys, trained_run, tmp_path):
    sources, expected = held_out(trained_run, 3)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(sources) + "\n")
    code, out, _ = tfkit(capsys, "predict", str(trained_run), str(source), "--out", str(tmp_path / "out.txt"))
    assert code == 0 and out == ""
    assert (tmp_path / "out.txt").read_text().splitlines() == expected  # beam 3 agrees with greedy here


def test_predict_refuses_bad_counts_and_an_unwritable_out_before_any_work(capsys, trained_run, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("eins\n")
    for args, fragment in [
        (["--beam", "0"], "--beam must be at least 1, got 0"),
        (["--out", str(tmp_path / "no" / "such" / "out.txt")], "cannot write --out"),
    ]:
        code, out, err = tfkit(capsys, "predict", str(trained_run), str(source), *args)
        assert code == 2 and out == ""
        one_error_line(err, fragment)
    code, _, err = tfkit(capsys, "inspect-attention", str(trained_run), "eins", "--out", str(source))  # a file, not a folder
    assert code == 2
    one_error_line(err, "cannot create the folder")


def test_evaluate_prints_json(capsys, trained_run):
    code, out, _ = tfkit(capsys, "evaluate", str(trained_run), "--json", "--beam", "1")
    metrics = json.loads(out)
    assert code == 0 and set(metrics) == {"exact_match", "chrf", "bleu"} and metrics["chrf"] > 80


def test_inspect_attention_dumps_every_head(capsys, trained_run, tmp_path):
    out_dir = tmp_path / "attention"
    code, out, err = tfkit(capsys, "inspect-attention", str(trained_run), "fünfundzwanzig", "--out", str(out_dir))
    assert code == 0, err
    tokens = json.loads((out_dir / "tokens.json").read_text())
    weights = np.load(out_dir / "attention.npz")
    expected = {
        f"{side}.layers.{i}.{kind}"
        for i in range(2)
        for side, kind in [("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "cross_attn")]
    }
    assert set(weights.files) == expected
    source, target = len(tokens["axes"]["source"]), len(tokens["axes"]["target"])
    assert weights["encoder.layers.0.self_attn"].shape == (4, source, source)
    assert weights["decoder.layers.1.cross_attn"].shape == (4, target, source)
    assert weights["decoder.layers.0.self_attn"].shape == (4, target, target)
    np.testing.assert_allclose(weights["decoder.layers.1.cross_attn"].sum(-1), 1.0, atol=1e-5)
    assert np.triu(weights["decoder.layers.0.self_attn"], 1).max() == 0  # causal
    assert sorted(p.name for p in out_dir.glob("*.png")) == sorted(f"{name}.png" for name in expected)
    assert "entropy" in out and "decoder.layers.1.cross_attn" in out


def test_user_tsv_and_jsonl_data_train_end_to_end(capsys, tmp_path):
    from num2words import num2words

    numbers = range(1, 200)
    tsv, jsonl = tmp_path / "pairs.tsv", tmp_path / "pairs.jsonl"
    tsv.write_text("en\tfr\n" + "".join(f"{num2words(n)}\t{num2words(n, lang='fr')}\n" for n in numbers))
    jsonl.write_text("".join(json.dumps({"source": num2words(n), "target": num2words(n, lang="es")}) + "\n" for n in numbers))
    small = [
        "--set",
        "data.vocab_size=100",
        "--set",
        "train.batch_size=16",
        "--set",
        "train.log_every=1",
        "--set",
        "model.d_model=32",
        "--set",
        "model.d_ff=64",
        "--set",
        "decode.beam=2",
    ]
    for data, columns in ((tsv, ["--set", "data.source_column=en", "--set", "data.target_column=fr"]), (jsonl, [])):
        run = tmp_path / data.suffix[1:]
        code, out, err = tfkit(
            capsys, "train", "translation", "--data", str(data), "--max-steps", "3", "--out", str(run), *small, *columns
        )
        assert code == 0, err
        assert out.strip() == str(run)
        assert {p.name for p in run.iterdir()} == {"config.yaml", "checkpoints", "tokenizer.json", "metrics.jsonl"}
        assert {p.name for p in runs.last_checkpoint(run).iterdir()} == {"model.safetensors", "state.pt"}
        assert [r["step"] for r in runs.read_metrics(run) if "loss" in r] == [1, 2, 3]


def test_resume_through_the_cli_and_refusing_to_overwrite(capsys, tmp_path):
    sets = sum((["--set", s] for s in [*TINY["translation"], "data.train_size=200", "train.eval_every=0"]), [])
    run = tmp_path / "run"
    code, _, err = tfkit(capsys, "train", "translation", "--max-steps", "2", "--out", str(run), *sets)
    assert code == 0, err
    code, _, err = tfkit(capsys, "train", "translation", "--out", str(run), *sets)
    assert code == 2
    one_error_line(err, "already holds a run")
    code, _, err = tfkit(capsys, "train", "--resume", str(run), "--set", "train.lr=1")
    assert code == 2
    one_error_line(err, "--resume continues a run with its own config")
    code, _, err = tfkit(capsys, "train", "--resume", str(run), "--max-steps", "-1")
    assert code == 2
    one_error_line(err, "config key 'train.steps' must be at least 0, got -1")
    code, _, err = tfkit(capsys, "train", "--resume", str(run), "--max-steps", "4")
    assert code == 0, err
    assert [r["step"] for r in runs.read_metrics(run) if "loss" in r] == [2, 4]  # log_every 10: only the ends


def test_the_installed_entry_point_hides_tracebacks_unless_debug():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "tfkit", "train", "translation", "--set", "nope=1"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stdout == ""
    one_error_line(result.stderr, "unknown config key 'nope'")
    for debug in ([*command[:3], "--debug", *command[3:]], [*command, "--debug"]):
        result = subprocess.run(debug, capture_output=True, text=True, env=env)
        assert result.returncode != 0 and "Traceback" in result.stderr

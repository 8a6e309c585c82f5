"""One policy for bad training data in every recipe that reads user files (tfkit.data.Unusable): a file
that cannot be read or decoded, or a row without its texts, is skipped with one warning naming it;
more than 1% of a split stop preparation in one error line. Preparation shows progress in a log."""

import json

import numpy as np
import pytest
import soundfile
from PIL import Image

from conftest import as_sets, one_error_line, tfkit
from tfkit import progress

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def progress_at_once(monkeypatch):
    """Progress lines from the first input on (small data would otherwise stay quiet)."""
    monkeypatch.setattr(progress, "QUIET_S", 0.0)


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: skipped")]


# -- vit: image folders ---------------------------------------------------------------------------
VIT = [
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


def image_folder(root, good: int, bad: int):
    rng = np.random.default_rng(0)
    for i in range(good):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for i in range(bad):
        (root / "class_0" / f"broken{i}.png").write_bytes(b"not an image at all")


def test_vit_skips_one_unreadable_image_and_stops_at_many(capsys, tmp_path, progress_at_once):
    image_folder(tmp_path / "one", 120, 1)
    code, _, err = tfkit(capsys, "train", "vit", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "run"), *VIT)
    assert code == 0, err
    (warning,) = warnings_in(err)
    assert "broken0.png: not a readable image" in warning and "skipped 1 of the" in warning
    assert "decoding the train images: " in err and " images/s" in err  # progress, as lines in a log
    image_folder(tmp_path / "many", 120, 5)
    code, _, err = tfkit(capsys, "train", "vit", "--data", str(tmp_path / "many"), *VIT)
    assert code == 2
    one_error_line(err, "images in the train data cannot be used, more than 1%")


# -- conformer: manifests of recordings -----------------------------------------------------------
CONFORMER = [
    "--max-steps",
    "2",
    "--set",
    "model.layers=1",
    "--set",
    "model.d_model=32",
    "--set",
    "model.d_ff=64",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.eval_every=0",
]


def recordings(root, good: int, bad: int, short: int = 0) -> None:
    """A train manifest of ``good`` one-second tones, ``bad`` undecodable files and ``short`` 10 ms
    blips, and small validation and test ones."""
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(good):
        tone = 0.3 * np.sin(2 * np.pi * (200 + 20 * i) * np.arange(16000) / 16000) + rng.normal(0, 0.01, 16000)
        soundfile.write(root / f"{i}.wav", tone.astype(np.float32), 16000)
        rows.append((f"{i}.wav", "ab ba"))
    for i in range(bad):
        (root / f"broken{i}.wav").write_bytes(b"not audio")
        rows.append((f"broken{i}.wav", "ab"))
    for i in range(short):
        soundfile.write(root / f"blip{i}.wav", rng.uniform(-0.5, 0.5, 160).astype(np.float32), 16000)
        rows.append((f"blip{i}.wav", "a"))
    for split, chosen in (("train", rows), ("validation", rows[:3]), ("test", rows[3:6])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"audio": p, "text": t}) + "\n" for p, t in chosen))


def test_conformer_skips_one_unreadable_recording_and_stops_at_many(capsys, tmp_path, progress_at_once):
    recordings(tmp_path / "one", 40, 1, short=3)
    code, _, err = tfkit(
        capsys, "train", "conformer", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "run"), *CONFORMER
    )
    assert code == 0, err
    unreadable, short = warnings_in(err)
    assert "skipped 1 of the 44 recordings in the train data" in unreadable and "broken0.wav: not a readable audio" in unreadable
    # 3 of 44 too short is more than 1%, and still a warning: a filter on the data, not damage
    assert "skipped 3 of the 44 recordings in the train data as too short" in short and "blip0.wav" in short
    assert "reading the train recordings: " in err
    recordings(tmp_path / "many", 40, 2)
    code, _, err = tfkit(capsys, "train", "conformer", "--data", str(tmp_path / "many"), *CONFORMER)
    assert code == 2
    one_error_line(err, "2 of the 42 recordings in the train data cannot be used")


# -- translation: rows of sentence pairs ----------------------------------------------------------
TRANSLATION = [
    "--max-steps",
    "2",
    "--set",
    "data.vocab_size=100",
    "--set",
    "train.batch_size=16",
    "--set",
    "model.d_model=32",
    "--set",
    "model.d_ff=64",
    "--set",
    "train.eval_every=0",
]


def pairs_file(path, good: int, bad: int) -> None:
    from num2words import num2words

    rows = [f"{num2words(n)}\t{num2words(n, lang='fr')}\n" for n in range(good)]
    rows[50:50] = [f"{num2words(n)}\t\n" for n in range(bad)]  # a row without its target
    path.write_text("source\ttarget\n" + "".join(rows))


def test_translation_skips_a_row_without_its_target_and_stops_at_many(capsys, tmp_path, progress_at_once):
    pairs_file(tmp_path / "one.tsv", 400, 1)
    code, _, err = tfkit(
        capsys, "train", "translation", "--data", str(tmp_path / "one.tsv"), "--out", str(tmp_path / "run"), *TRANSLATION
    )
    assert code == 0, err
    (warning,) = warnings_in(err)
    assert "skipped 1 of the" in warning and "sentence pairs in the train data" in warning and "lacks a target text" in warning
    assert "training the tokenizer on the train pairs: " in err and "encoding the train pairs: " in err
    pairs_file(tmp_path / "many.tsv", 400, 20)
    code, _, err = tfkit(capsys, "train", "translation", "--data", str(tmp_path / "many.tsv"), *TRANSLATION)
    assert code == 2
    one_error_line(err, "sentence pairs in the train data cannot be used, more than 1%")


def test_translation_a_single_file_that_is_not_utf8_is_one_error_line(capsys, tmp_path):
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("source\ttarget\n".encode() + "déjà vu\tschon gesehen\n".encode("latin-1") * 50)
    code, _, err = tfkit(capsys, "train", "translation", "--data", str(bad), *TRANSLATION)
    assert code == 2
    one_error_line(err, "latin1.tsv")


# -- bert-pretrain: a folder of text files --------------------------------------------------------
BERT = [
    "--max-steps",
    "2",
    *as_sets(
        ["data.vocab_size=200", "model.d_model=32", "model.d_ff=64", "model.layers=1", "train.batch_size=8", "train.eval_every=0"]
    ),
]


def text_folder(root, good: int, bad: int) -> None:
    (root / "more").mkdir(parents=True)
    for d in range(good):
        story = [f"Sentence {s} of story {d} talks about item {d * s}." for s in range(5)]
        (root / ("more" if d % 2 else ".") / f"story{d}.txt").write_text("\n".join(story) + "\n")
    for i in range(bad):
        (root / f"latin{i}.txt").write_bytes("Déjà vu, à la carte.\nÇa va.\n".encode("latin-1"))


def test_bert_pretrain_skips_one_file_that_is_not_utf8_and_stops_at_many(capsys, tmp_path, progress_at_once):
    text_folder(tmp_path / "one", 120, 1)
    code, _, err = tfkit(capsys, "train", "bert-pretrain", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "run"), *BERT)
    assert code == 0, err
    (warning,) = warnings_in(err)
    assert "skipped 1 of the 121 text files in the train data" in warning and "latin0.txt: not UTF-8 text" in warning
    assert "reading the 121 text files: " in err and "encoding the train sentences: " in err
    text_folder(tmp_path / "many", 120, 3)
    code, _, err = tfkit(capsys, "train", "bert-pretrain", "--data", str(tmp_path / "many"), *BERT)
    assert code == 2
    one_error_line(err, "3 of the 123 text files in the train data cannot be used, more than 1%")


def test_bert_pretrain_a_single_file_that_is_not_utf8_is_one_error_line(capsys, tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("Déjà vu, à la carte.\nÇa va.\n\nUne autre histoire.\nEncore.\n".encode("latin-1") * 20)
    code, _, err = tfkit(capsys, "train", "bert-pretrain", "--data", str(bad), *BERT)
    assert code == 2
    one_error_line(err, "latin.txt")


# -- the progress itself --------------------------------------------------------------------------
def test_progress_in_a_log_is_a_line_every_tenth_and_one_at_the_end(capsys, progress_at_once):
    with progress.Preparing("reading things", total=50, unit="files") as shown:
        for _ in range(50):
            shown.advance(1, 1_000_000)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("reading things: 1/50 files (2%)  1.0 MB  ") and "ETA" in lines[0]
    assert any(line.startswith("reading things: 5/50 files (10%)") for line in lines)
    assert len(lines) == 1 + 10 + 1 and lines[-1].startswith("reading things: 50 files  50.0 MB in 0:00:0")


def test_progress_is_quiet_for_a_short_step(capsys):
    with progress.Preparing("reading things", total=50) as shown:
        for _ in range(50):
            shown.advance()
    assert capsys.readouterr().err == ""

"""The speech the recipe reads: recordings of any user's manifest or folder, decoded and turned into
training samples or log-mel features; the built-in corpus, numbers spoken by eSpeak NG in every
English accent and voice variant it has, with test speakers unseen in training and a second test set
on a channel unseen in training; and the CTC character vocabulary (:func:`ctc_characters`)."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import datasets
import numpy as np
import pyarrow as pa
import soundfile
import torch
import torchaudio
import torchaudio.functional as AF
from num2words import num2words
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor

from tfkit.data import SPLITS, cached, encode_once, list_column, report_unusable
from tfkit.errors import UsageError
from tfkit.nn.conformer import ConvolutionSubsampling
from tfkit.progress import Preparing
from tfkit.recipes.conformer.augment import (
    add_noise,
    babble,
    coloured_noise,
    reverberate,
    room_impulse_response,
    uniform,
)

SPECIALS = ["<blank>", "<unk>"]
BLANK = 0
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}
MAX_SECONDS = 300  # the longest recording read: 7,500 encoder frames, whose attention maps take 900 MB per layer


# -- user recordings --------------------------------------------------------------------------------
def read_audio(path: Path | str | None, data: bytes | None, sample_rate: int) -> Tensor:
    """Decode a WAV/FLAC/OGG file (or its bytes) to mono float32 at ``sample_rate``; an unreadable,
    empty, silent or too long (MAX_SECONDS, read from the header) file is a UsageError naming it."""
    if data is None and not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    source = io.BytesIO(data) if data is not None else path
    try:
        seconds = soundfile.info(source).duration
        if seconds > MAX_SECONDS:
            raise UsageError(
                f"{path}: the recording is {seconds:.0f} s long, more than the {MAX_SECONDS} s tfkit "
                f"transcribes at once (attention grows with its square: cut it into shorter pieces)"
            )
        if data is not None:
            source.seek(0)
        samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise UsageError(
            f"{path}: not a readable audio file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if samples.shape[0] == 0:
        raise UsageError(f"{path}: the audio is empty")
    mono = torch.from_numpy(samples.mean(axis=1))
    if not torch.isfinite(mono).all():  # a float file can hold them; they would make every feature NaN
        raise UsageError(f"{path}: the audio holds {int((~torch.isfinite(mono)).sum())} non-finite samples (NaN or Inf)")
    if mono.abs().max() < 1e-4:
        raise UsageError(f"{path}: the audio is silent")
    return torchaudio.functional.resample(mono, rate, sample_rate) if rate != sample_rate else mono


def to_int16(samples: Tensor) -> np.ndarray:
    """Samples in [-1, 1] as 16-bit integers, as a WAV file holds them."""
    return (samples * 32768).round().clamp(-32768, 32767).to(torch.int16).numpy()


def normalise_text(text: str, lowercase: bool) -> str:
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def featurise(
    rows: datasets.Dataset, split: str, data: dict[str, Any], features: dict[str, Any], log_mel: Callable[[Tensor], Tensor]
) -> datasets.Dataset:
    """Rows of transcript, frame count and log-mel features (flattened), or for training the 16-bit
    samples the loader augments; each audio cell is a path (relative to the manifest or folder
    ``data.name``) or decoded bytes, read with progress shown. Two kinds of recording are left with
    0 frames (held-out splits drop them), each reported in one warning naming the first few:

    - one that cannot be read or decoded (or is empty, silent, too long) is *unusable*: counted under
      :class:`tfkit.data.Unusable`'s rule, so more than 1% of a split stops preparation in one line,
      since that many is a wrong folder or a broken download;
    - one too short to leave a frame after subsampling is a good file the model cannot use, like an
      utterance too short for its transcript (the recipe drops those too): it is a filter on the
      data, not damage, and does not count toward the 1% (a corpus of short clips is still a corpus)."""
    if isinstance(rows.features[data["audio_column"]], datasets.Audio):
        rows = rows.cast_column(data["audio_column"], datasets.Audio(decode=False))
    spec = Path(data["name"]).expanduser()
    base = spec if spec.is_dir() else spec.parent  # paths in a manifest are relative to it
    kept = "samples" if split == "train" else "features"

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"text": [], kept: [], "frames": [], "problem": [], "short": []}
        for number, cell, text in zip(indices, batch[data["audio_column"]], batch[data["text_column"]]):
            if not isinstance(text, str) or not text.strip():
                raise UsageError(f"the {split} data's row {number + 1} has no transcript in column '{data['text_column']}'")
            path = base / cell if isinstance(cell, str) else cell.get("path")
            samples, problem, short = torch.zeros(0), "", ""
            try:
                if isinstance(cell, str):
                    samples = read_audio(path, None, data["sample_rate"])
                else:
                    samples = read_audio(path, cell.get("bytes"), data["sample_rate"])
                if ConvolutionSubsampling.output_lengths(torch.tensor(log_mel.frames(len(samples)))) < 1:
                    short = f"{path or f'row {number + 1}'} ({len(samples) / data['sample_rate']:.3f} s)"
            except UsageError as e:
                problem = str(e)
            shown.advance(1, len(cell["bytes"]) if isinstance(cell, dict) and cell.get("bytes") else _file_size(path))
            if problem or short:
                samples = torch.zeros(0)
            out["text"].append(normalise_text(text, data["lowercase"]))
            if kept == "samples":
                out[kept].append(to_int16(samples))
            else:
                out[kept].append(log_mel(samples).flatten().numpy())
            out["frames"].append(log_mel.frames(len(samples)))
            out["problem"].append(problem)
            out["short"].append(short)
        return out

    # "short": the column that tells a too-short recording from an unreadable one (a cache written
    # before it holds only "problem", and is not reused)
    settings = [
        split,
        kept,
        *(data[k] for k in ("name", "audio_column", "text_column", "sample_rate", "lowercase")),
        features,
        "short",
    ]
    values = datasets.Sequence(datasets.Value("int16" if kept == "samples" else "float32"))
    columns = datasets.Features(
        {
            "text": datasets.Value("string"),
            kept: values,
            "frames": datasets.Value("int64"),
            "problem": datasets.Value("string"),
            "short": datasets.Value("string"),
        }
    )
    with Preparing(f"reading the {split} recordings", total=len(rows), unit="recordings") as shown:
        done = encode_once(rows, encode, settings, columns)
    report_unusable(done, split, "recordings")
    short = [name for name in done["short"][:] if name]
    if short:
        named = "; ".join(short[:3]) + (f"; and {len(short) - 3} more" if len(short) > 3 else "")
        print(
            f"warning: skipped {len(short)} of the {len(done)} recordings in the {split} data as too short to leave one "
            f"frame after subsampling ({named})",
            file=sys.stderr,
        )
    if not any(frames > 0 for frames in done["frames"][:]):
        raise UsageError(f"none of the {len(done)} recordings in the {split} data can be used (too short or unreadable)")
    return done if split == "train" else done.filter(lambda frames: frames > 0, input_columns="frames")


def _file_size(path: Path | str | None) -> int:
    try:
        return os.path.getsize(path)
    except (OSError, TypeError):
        return 0


def stored_features(rows: pa.Table, n_mels: int) -> list[Tensor]:
    """The stored (flattened) feature rows of an Arrow table, each as (T, n_mels): views of one
    buffer read at once (numpy formatting converts row by row)."""
    values, bounds = list_column(rows, "features")
    return [values[start:end].view(-1, n_mels) for start, end in zip(bounds, bounds[1:])]


def ctc_characters(texts: Iterable[str], specials: list[str]) -> Tokenizer:
    """Characters in fewer CTC labels than letters: a word's first letter carries the word boundary
    (``▁t``, SentencePiece's mark) and a doubled letter is one label (``ee``), since CTC spends a blank
    between two equal labels: "three three" is 8 labels where letters, boundaries and the blank
    between the e's take 14, which matters at eSpeak's default rate (about 12 frames of 40 ms for
    it). A BPE whose only merges are those two kinds, so that tokenizer.json decodes it anywhere."""
    characters: set[str] = set()
    initials: set[str] = set()
    doubled: set[str] = set()
    for text in texts:
        characters.update(text)
        initials.update(word[0] for word in text.split())
        doubled.update(a for a, b in zip(text, text[1:]) if a == b != " ")
    merges = [("▁", c) for c in sorted(initials)] + [(c, c) for c in sorted(doubled)]  # in this order: ▁ee is ▁e e
    pieces = [*specials, "▁", *sorted(characters - {" ", "▁"}), *(a + b for a, b in merges)]
    tokenizer = Tokenizer(models.BPE({piece: i for i, piece in enumerate(pieces)}, merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return tokenizer


# -- the built-in speech ----------------------------------------------------------------------------
DIGITS = "zero one two three four five six seven eight nine".split()
# eSpeak NG's English voices (en-Shaw, also English, writes Shavian letters); each speaker is one of
# these with a voice variant, or with none (the plain voice: the default `espeak-ng` speaks with)
ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc", "en-029")
RATES, PITCHES, PITCH_RANGES = (120, 240), (10, 90), (20, 100)  # words per minute; eSpeak's 0..100 scales
PLAIN_SHARE = 0.1  # of training utterances in a plain voice: the one a user's `espeak-ng "..."` speaks
# the held-out channel: a room more reverberant than any training draws (augment.reverb.rt60_s is at
# most 0.5 s there), other speakers talking whose voices training never heard (its babble is of
# training voices), and a small loudspeaker's band (training band-limits only through the 8 kHz
# telephone channel)
HELD_OUT_CHANNEL = {
    "rt60_s": (0.6, 0.9),
    "drr_db": (0.0, 6.0),
    "babble_voices": 3,
    "snr_db": (10.0, 20.0),
    "band_hz": (400.0, 5000.0),
}
SPLIT_NAMES = (*SPLITS, "test_channel")
ESPEAK_TAIL_S = 0.3  # what `espeak-ng -w` writes after the last sound


def speech_corpus(data: dict[str, Any], seed: int) -> datasets.DatasetDict:
    keys = ("train_size", "validation_size", "test_size", "sample_rate", "snr_db", "pause_s")
    key = {
        "seed": seed,
        **{k: data[k] for k in keys},
        "accents": ACCENTS,
        "plain": PLAIN_SHARE,
        "channel": HELD_OUT_CHANNEL,
        "draws": [RATES, PITCHES, PITCH_RANGES],
    }
    return cached("speech", key, lambda: _speech_corpus(data, seed))


def _speech_corpus(data: dict[str, Any], seed: int) -> datasets.DatasetDict:
    """Speakers are voice variants, split 70/10/20 so validation and test voices never occur in
    training; the plain voices speak :data:`PLAIN_SHARE` of the training utterances. Accent, rate,
    pitch, pitch range and the pauses around the words are drawn per utterance, each split from its
    own seed, so one split's size leaves the others as they were. Training audio is clean, for the
    loader's augmentation; validation and test carry white noise at ``snr_db``; ``test_channel`` is
    the test utterances, clean, through :data:`HELD_OUT_CHANNEL`."""
    from tfkit.recipes.conformer.espeak import synthesizer

    synth = synthesizer()
    rng = random.Random(seed)
    variants = synth.variants()
    rng.shuffle(variants)
    cut = [round(0.7 * len(variants)), round(0.8 * len(variants))]
    speakers = dict(zip(SPLITS, (variants[: cut[0]], variants[cut[0] : cut[1]], variants[cut[1] :])))
    resample = torchaudio.transforms.Resample(synth.sample_rate, data["sample_rate"])  # its kernel is built once
    rows: dict[str, dict[str, list]] = {split: {"audio": [], "text": [], "speaker": []} for split in SPLIT_NAMES}
    clean_test: list[Tensor] = []
    for split in SPLITS:
        rng = random.Random(f"{seed}:{split}")
        for _ in range(data[f"{split}_size"]):
            text = number_text(rng)
            plain = split == "train" and rng.random() < PLAIN_SHARE
            speaker = rng.choice(ACCENTS) + ("" if plain else f"+{rng.choice(speakers[split])}")
            samples = synth.speak(
                text, speaker, rate=rng.randint(*RATES), pitch=rng.randint(*PITCHES), pitch_range=rng.randint(*PITCH_RANGES)
            )
            samples = resample(torch.from_numpy(samples))
            # eSpeak's library ends an utterance 8 ms after its last sound, a recording (or eSpeak's
            # own command line, 0.3 s) later: without pauses in training, CTC spells out the silence
            before, after = (round(rng.uniform(*data["pause_s"]) * data["sample_rate"]) for _ in range(2))
            samples = torch.nn.functional.pad(samples, (before, after))
            if split == "test":
                clean_test.append(samples)
            if split != "train":
                noise = coloured_noise(len(samples), "white", torch.Generator().manual_seed(rng.getrandbits(62)))
                samples = add_noise(samples, noise, rng.uniform(*data["snr_db"]))
            _add_row(rows[split], samples, text, speaker, data["sample_rate"])
    for i, samples in enumerate(clean_test):  # the test split's generator goes on to draw the channel
        others = [
            clean_test[j]
            for j in rng.sample(
                [j for j in range(len(clean_test)) if j != i], k=min(HELD_OUT_CHANNEL["babble_voices"], len(clean_test) - 1)
            )
        ]
        generator = torch.Generator().manual_seed(rng.getrandbits(62))
        _add_row(
            rows["test_channel"],
            held_out_channel(samples, others, data["sample_rate"], generator),
            rows["test"]["text"][i],
            rows["test"]["speaker"][i],
            data["sample_rate"],
        )
    # the layout of datasets.Audio(decode=False), without its encoder's torchcodec dependency
    audio = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"audio": audio, "text": datasets.Value("string"), "speaker": datasets.Value("string")})
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(rows[split], features=features) for split in SPLIT_NAMES})


def held_out_channel(samples: Tensor, others: list[Tensor], sample_rate: int, generator: torch.Generator) -> Tensor:
    """``samples`` played in a reverberant room over ``others`` talking, through a small loudspeaker's band."""
    channel = HELD_OUT_CHANNEL
    room = room_impulse_response(
        uniform(channel["rt60_s"], generator), uniform(channel["drr_db"], generator), sample_rate, generator
    )
    crowd = babble(len(samples), others, generator)
    noisy = add_noise(reverberate(samples, room), crowd, uniform(channel["snr_db"], generator))
    low, high = channel["band_hz"]
    return AF.lowpass_biquad(AF.highpass_biquad(noisy, sample_rate, low), sample_rate, high).clamp(-1, 1)


def _add_row(rows: dict[str, list], samples: Tensor, text: str, speaker: str, sample_rate: int) -> None:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples.clamp(-1, 1).numpy(), sample_rate, format="FLAC")
    rows["audio"].append({"bytes": buffer.getvalue(), "path": None})
    rows["text"].append(text)
    rows["speaker"].append(speaker)


def number_text(rng: random.Random) -> str:
    """A digit string read digit by digit ("four two seven") or a number in words ("forty seven")."""
    if rng.random() < 0.5:
        return " ".join(DIGITS[rng.randrange(10)] for _ in range(rng.randint(3, 7)))
    n = rng.randint(0, 10 ** rng.randint(1, 6) - 1)
    return num2words(n).replace("-", " ").replace(",", "")


def digit_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 7))) for _ in range(count)]


def default_voice_files(texts: list[str], folder: Path) -> list[Path]:
    """WAV files of ``texts`` as a user makes them: ``espeak-ng -w``, eSpeak NG's plain default voice
    at its default rate and pitch, clean; the library tfkit trains with (and the command's 0.3 s
    tail) when the command is not installed (Debian: espeak-ng)."""
    paths = [folder / f"espeak{i}.wav" for i in range(len(texts))]
    if shutil.which("espeak-ng"):
        for text, path in zip(texts, paths):
            subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
        return paths
    from tfkit.recipes.conformer.espeak import synthesizer

    synth = synthesizer()
    for text, path in zip(texts, paths):
        samples = np.concatenate([synth.speak(text, "en"), np.zeros(round(ESPEAK_TAIL_S * synth.sample_rate), np.float32)])
        soundfile.write(path, samples, synth.sample_rate)
    return paths

"""The built-in speech: numbers spoken by eSpeak NG, in every English accent it has and every voice
variant, with test speakers unseen in training and a second test set on a channel unseen in training."""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import soundfile
import torch
import torchaudio
import torchaudio.functional as AF
from num2words import num2words
from torch import Tensor

from tfkit.data import SPLITS, cached
from tfkit.recipes.conformer.augment import (
    add_noise,
    babble,
    coloured_noise,
    reverberate,
    room_impulse_response,
    uniform,
)

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
HELD_OUT_CHANNEL = {"rt60_s": (0.6, 0.9), "drr_db": (0.0, 6.0), "babble_voices": 3, "snr_db": (10.0, 20.0), "band_hz": (400.0, 5000.0)}
SPLIT_NAMES = (*SPLITS, "test_channel")
ESPEAK_TAIL_S = 0.3  # what `espeak-ng -w` writes after the last sound


def speech_corpus(data: dict[str, Any], seed: int) -> datasets.DatasetDict:
    keys = ("train_size", "validation_size", "test_size", "sample_rate", "snr_db", "pause_s")
    key = {"seed": seed, **{k: data[k] for k in keys}, "accents": ACCENTS, "plain": PLAIN_SHARE, "channel": HELD_OUT_CHANNEL,
           "draws": [RATES, PITCHES, PITCH_RANGES]}
    return cached("speech", key, lambda: _speech_corpus(data, seed))


def _speech_corpus(data: dict[str, Any], seed: int) -> datasets.DatasetDict:
    """Speakers are voice variants, split 70/10/20 so validation and test voices never occur in
    training; the plain voices speak :data:`PLAIN_SHARE` of the training utterances. Accent, rate,
    pitch, pitch range and the pauses around the words are drawn per utterance, each split from its
    own seed, so one split's size leaves the others as they were. Training audio is clean, for the
    loader's augmentation; validation and test carry white noise at ``snr_db``; ``test_channel`` is
    the test utterances, clean, through :data:`HELD_OUT_CHANNEL`."""
    from tfkit.espeak import synthesizer

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
            samples = synth.speak(text, speaker, rate=rng.randint(*RATES), pitch=rng.randint(*PITCHES), pitch_range=rng.randint(*PITCH_RANGES))
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
        others = [clean_test[j] for j in rng.sample([j for j in range(len(clean_test)) if j != i], k=min(HELD_OUT_CHANNEL["babble_voices"], len(clean_test) - 1))]
        generator = torch.Generator().manual_seed(rng.getrandbits(62))
        _add_row(rows["test_channel"], held_out_channel(samples, others, data["sample_rate"], generator),
                 rows["test"]["text"][i], rows["test"]["speaker"][i], data["sample_rate"])
    # the layout of datasets.Audio(decode=False), without its encoder's torchcodec dependency
    audio = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"audio": audio, "text": datasets.Value("string"), "speaker": datasets.Value("string")})
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(rows[split], features=features) for split in SPLIT_NAMES})


def held_out_channel(samples: Tensor, others: list[Tensor], sample_rate: int, generator: torch.Generator) -> Tensor:
    """``samples`` played in a reverberant room over ``others`` talking, through a small loudspeaker's band."""
    channel = HELD_OUT_CHANNEL
    room = room_impulse_response(uniform(channel["rt60_s"], generator), uniform(channel["drr_db"], generator), sample_rate, generator)
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
    from tfkit.espeak import synthesizer

    synth = synthesizer()
    for text, path in zip(texts, paths):
        samples = np.concatenate([synth.speak(text, "en"), np.zeros(round(ESPEAK_TAIL_S * synth.sample_rate), np.float32)])
        soundfile.write(path, samples, synth.sample_rate)
    return paths

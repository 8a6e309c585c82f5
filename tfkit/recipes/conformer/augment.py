"""Speech augmentation as Kaldi and ESPnet recipes use it, one utterance at a time.

In training each utterance of a batch takes, in this order and each with its own rate: speed
perturbation (tempo and pitch together, Ko et al., 2015), a synthesised room, additive noise of a
colour, other speakers (babble), a telephone channel, and vocal-tract-length perturbation of its
spectrum (Jaitly and Hinton, 2013; applied by :class:`~tfkit.recipes.conformer.model.LogMel`). Every draw comes from the
``torch.Generator`` passed in, which the loader seeds by batch, so a resumed run replays the same
audio. The same pieces render the built-in speech's held-out channel, with settings training never
draws. Last, SpecAugment masks the batch's features (:func:`spec_augment`).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch
import torchaudio
import torchaudio.functional as AF
from torch import Tensor

# the exponent of each colour's power spectrum, 1/f^exponent
COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0, "blue": -1.0}
TELEPHONE_RATE = 8000


@cache
def fast_length(n: int) -> int:
    """The least length from ``n`` with no prime factor above 5: an FFT of a length with a large prime
    factor is many times slower, and the next power of two can be nearly twice as long."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def uniform(low_high: list[float] | tuple[float, float], generator: torch.Generator) -> float:
    low, high = low_high
    return low + (high - low) * torch.rand((), generator=generator).item()


def choice(options: list[Any], generator: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (), generator=generator))]


@cache
def resampler(from_rate: int, to_rate: int) -> torchaudio.transforms.Resample:
    """torchaudio's sinc resampling with its kernel built once (``AF.resample`` builds it per call)."""
    return torchaudio.transforms.Resample(from_rate, to_rate)


def speed(samples: Tensor, factor: float, sample_rate: int) -> Tensor:
    """Played ``factor`` times as fast (Kaldi's speed perturbation: tempo and pitch move together):
    read as if recorded at ``factor`` times the rate, as ``torchaudio.functional.speed`` does."""
    return samples if factor == 1 else resampler(int(factor * sample_rate), sample_rate)(samples)


def room_impulse_response(rt60: float, drr_db: float, sample_rate: int, generator: torch.Generator) -> Tensor:
    """A direct path, then a diffuse late field: Gaussian noise whose energy falls 60 dB in ``rt60``
    seconds (Polack's statistical model), ``drr_db`` below the direct path in energy, arriving
    from 2.5 ms on (the first reflections of a room of a few metres)."""
    length = max(2, round(rt60 * sample_rate))
    t = torch.arange(length) / sample_rate
    tail = torch.randn(length, generator=generator) * torch.exp(-3 * math.log(10) * t / rt60)
    tail[: round(0.0025 * sample_rate)] = 0
    tail *= (10 ** (-drr_db / 10) / tail.square().sum()).sqrt()
    tail[0] = 1.0
    return tail


def reverberate(samples: Tensor, impulse_response: Tensor) -> Tensor:
    """``samples`` in the room, cut to their own length (the pause after an utterance holds its tail),
    at the peak level they had."""
    size = fast_length(len(samples) + len(impulse_response) - 1)
    wet = torch.fft.irfft(torch.fft.rfft(samples, size) * torch.fft.rfft(impulse_response, size), size)[: len(samples)]
    return wet * (samples.abs().max() / wet.abs().max().clamp_min(1e-9))


def coloured_noise(length: int, colour: str, generator: torch.Generator) -> Tensor:
    """Gaussian noise with a power spectrum falling as 1/f^exponent (white 0, pink 1, brown 2, blue -1)."""
    size = fast_length(length)
    # white noise's spectrum is itself complex Gaussian: draw it there, shape it, one inverse FFT
    spectrum = torch.view_as_complex(torch.randn(size // 2 + 1, 2, generator=generator))
    bins = torch.arange(len(spectrum)).clamp_min(1)
    return torch.fft.irfft(spectrum * bins ** (-COLOURS[colour] / 2), size)[:length]


def add_noise(samples: Tensor, noise: Tensor, snr_db: float) -> Tensor:
    return AF.add_noise(samples[None], noise[None], torch.tensor([snr_db]))[0]


def babble(length: int, voices: list[Tensor], generator: torch.Generator) -> Tensor:
    """Other speakers talking at once: ``voices`` summed at equal level, each from a random offset and
    looped to ``length`` samples (the babble noise of Kaldi's and ESPnet's MUSAN recipes)."""
    crowd = torch.zeros(length)
    for voice in voices:
        shift = int(torch.randint(len(voice), (), generator=generator))
        looped = voice.roll(shift).repeat(length // len(voice) + 1)[:length]
        crowd += looped / voice.square().mean().sqrt().clamp_min(1e-9)
    return crowd


def telephone(samples: Tensor, sample_rate: int) -> Tensor:
    """A narrow-band telephone line: 8 kHz sampling, a 300 Hz high-pass, 8-bit mu-law (G.711), and back."""
    narrow = resampler(sample_rate, TELEPHONE_RATE)(samples)
    narrow = AF.highpass_biquad(narrow, TELEPHONE_RATE, 300.0)
    coded = AF.mu_law_decoding(AF.mu_law_encoding(narrow.clamp(-1, 1), 256), 256)
    return resampler(TELEPHONE_RATE, sample_rate)(coded)[: len(samples)]


def vtlp_positions(bins: int, warp: float, boundary: float = 0.8) -> Tensor:
    """Where each output frequency bin reads the input spectrum under a warp of the frequency axis by
    ``warp`` (formants move up for warp > 1): f -> f * warp below ``boundary`` of the band, then a
    straight line that keeps the top of the band in place (Jaitly and Hinton, 2013)."""
    top = bins - 1
    knee = boundary * top * min(warp, 1.0) / warp  # input frequency where the warp turns linear
    outputs = torch.arange(bins, dtype=torch.float32)
    below = outputs / warp
    above = knee + (outputs - knee * warp) * (top - knee) / (top - knee * warp)
    return torch.where(outputs <= knee * warp, below, above).clamp(0, top)


def warp_spectrum(spectrum: Tensor, warp: float) -> Tensor:
    """A (freq, time) power spectrum read along its frequency axis at :func:`vtlp_positions`."""
    if warp == 1:
        return spectrum
    positions = vtlp_positions(spectrum.size(0), warp)
    low = positions.floor().long()
    high = (low + 1).clamp_max(spectrum.size(0) - 1)
    weight = (positions - low)[:, None]
    return spectrum[low] * (1 - weight) + spectrum[high] * weight


def augment(
    samples: Tensor, cfg: dict[str, Any], sample_rate: int, generator: torch.Generator, others: list[Tensor]
) -> tuple[Tensor, float]:
    """One training utterance through each augmentation its rate draws (config ``augment``), with
    ``others`` (the rest of its batch) as the voices of babble; returns the samples and the warp for
    the spectrum (1.0: none)."""

    def drawn(name: str) -> bool:
        return torch.rand((), generator=generator).item() < cfg[name]["rate"]

    if drawn("speed"):
        samples = speed(samples, choice(cfg["speed"]["factors"], generator), sample_rate)
    if drawn("reverb"):
        room = cfg["reverb"]
        response = room_impulse_response(
            uniform(room["rt60_s"], generator), uniform(room["drr_db"], generator), sample_rate, generator
        )
        samples = reverberate(samples, response)
    if drawn("noise"):
        noise = coloured_noise(len(samples), choice(cfg["noise"]["colours"], generator), generator)
        samples = add_noise(samples, noise, uniform(cfg["noise"]["snr_db"], generator))
    if drawn("babble") and others:
        picks = torch.randperm(len(others), generator=generator)[: cfg["babble"]["voices"]].tolist()
        crowd = babble(len(samples), [others[i] for i in picks], generator)
        samples = add_noise(samples, crowd, uniform(cfg["babble"]["snr_db"], generator))
    if drawn("telephone"):
        samples = telephone(samples, sample_rate)
    warp = uniform(cfg["vtlp"]["warp"], generator) if drawn("vtlp") else 1.0
    return samples, warp


def spec_augment(features: Tensor, lengths: Tensor, cfg: dict[str, Any]) -> Tensor:
    """SpecAugment (Park et al., 2019) on a padded batch (B, T, F): frequency masks up to
    ``freq_width`` bins, drawn per utterance, and time masks up to ``time_width`` frames but never
    more than ``time_ratio`` of each utterance's own length, so short utterances keep their words.
    Masked cells get 0, the normalised mean; the input is left as it was. Draws from the global
    generator (torchaudio's masks), which the loader seeds by batch."""
    spectrograms = features.transpose(1, 2)[:, None]  # torchaudio masks (batch, channel, freq, time)
    frequency = torchaudio.transforms.FrequencyMasking(cfg["freq_width"], iid_masks=True)
    for _ in range(cfg["freq_masks"]):
        spectrograms = frequency(spectrograms)
    masked = spectrograms[:, 0].transpose(1, 2)
    # each time mask is drawn as torchaudio's TimeMasking(time_width, p=time_ratio) draws one, but with
    # each utterance's own length as the axis, for the whole batch at once (TimeMasking per utterance
    # was most of the loader's time): a width uniform below the cap, a start uniform where it fits
    cap = (lengths * cfg["time_ratio"]).long().clamp_max(cfg["time_width"])
    frames, hit = torch.arange(features.size(1)), torch.zeros(features.shape[:2], dtype=torch.bool)
    for _ in range(cfg["time_masks"]):
        width = torch.rand(len(lengths)) * cap
        start = (torch.rand(len(lengths)) * (lengths - width)).long()
        hit |= (frames >= start[:, None]) & (frames < (start + width.long())[:, None])  # (B, T)
    return masked.masked_fill(hit[..., None], 0.0)

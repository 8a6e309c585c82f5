"""Speech augmentation (speed, rooms, coloured noise, the telephone channel, VTLP) and the built-in
speech: its voices, its unseen test speakers and its held-out channel."""

from __future__ import annotations

import io
import json
import math

import pytest
import soundfile
import torch
import torchaudio
import torchaudio.functional as AF

from conftest import one_error_line, recipe_config, tfkit
from tfkit import registry
from tfkit.recipes.conformer import augment as A
from tfkit.recipes.conformer import data as speech
from tfkit.recipes.conformer.model import LogMel

RATE = 16000


def tone(hz: float, seconds: float = 1.0) -> torch.Tensor:
    return 0.5 * torch.sin(2 * math.pi * hz * torch.arange(round(RATE * seconds)) / RATE)


def band_power(samples: torch.Tensor, low: float, high: float) -> float:
    power = torch.fft.rfft(samples).abs().square()
    hz = torch.fft.rfftfreq(len(samples), 1 / RATE)
    return float(power[(hz >= low) & (hz < high)].sum())


def peak_hz(samples: torch.Tensor) -> float:
    return float(torch.fft.rfftfreq(len(samples), 1 / RATE)[torch.fft.rfft(samples).abs().argmax()])


def default_augment() -> dict:
    return registry.get("recipe", "conformer").default_config()["augment"]


def test_speed_perturbation_moves_tempo_and_pitch_together():
    x = tone(1000)
    for factor in (0.9, 1.1):
        played = A.speed(x, factor, RATE)
        assert abs(len(played) - len(x) / factor) <= 2
        assert abs(peak_hz(played) - 1000 * factor) <= 2
        # the kernel built once is torchaudio's own, which builds it per call
        assert torch.allclose(played, AF.speed(x, RATE, factor)[0], atol=1e-5)
    assert A.speed(x, 1.0, RATE) is x


def test_a_room_decays_60_db_in_its_rt60_at_its_direct_to_reverberant_ratio():
    for rt60, drr in ((0.3, 0.0), (0.8, 10.0)):
        response = A.room_impulse_response(rt60, drr, RATE, torch.Generator().manual_seed(0))
        tail = response.clone()
        tail[0] = 0
        assert 10 * math.log10(1 / float(tail.square().sum())) == pytest.approx(drr, abs=1e-3)
        # Schroeder's backward integral; the slope from -5 to -25 dB (T20), extrapolated to 60 dB
        decay = 10 * torch.log10(tail.square().flip(0).cumsum(0).flip(0) / tail.square().sum())
        t5, t25 = (int((decay > level).sum()) for level in (-5, -25))
        assert 3 * (t25 - t5) / RATE == pytest.approx(rt60, rel=0.15)
    x = tone(300)
    wet = A.reverberate(x, A.room_impulse_response(0.5, 0.0, RATE, torch.Generator().manual_seed(1)))
    assert len(wet) == len(x) and wet.abs().max() == pytest.approx(x.abs().max())


def test_noise_has_its_colour_and_is_added_at_its_snr():
    x = tone(440)
    for colour, exponent in A.COLOURS.items():
        noise = A.coloured_noise(len(x), colour, torch.Generator().manual_seed(0))
        # power per hertz two octaves apart: 1/f^exponent is 6.02 dB per unit of exponent
        ratio_db = 10 * math.log10((band_power(noise, 2000, 4000) / 2000) / (band_power(noise, 500, 1000) / 500))
        assert ratio_db == pytest.approx(-6.02 * exponent, abs=1.0), colour
        noisy = A.add_noise(x, noise, 12.0)
        assert 10 * math.log10(float(x.square().sum() / (noisy - x).square().sum())) == pytest.approx(12.0, abs=0.01)


def test_babble_is_the_other_voices_at_equal_level_looped_to_length():
    voices = [tone(300, 0.3), 0.01 * tone(900, 0.7)]
    crowd = A.babble(RATE, voices, torch.Generator().manual_seed(0))
    assert len(crowd) == RATE
    assert band_power(crowd, 250, 350) == pytest.approx(band_power(crowd, 850, 950), rel=0.1)  # each at the same level


def test_the_telephone_channel_keeps_the_voice_band_only():
    for hz, kept in ((1000, True), (6000, False), (100, False)):
        x = tone(hz)
        y = A.telephone(x, RATE)
        assert len(y) == len(x)
        share = float(y.square().sum() / x.square().sum())
        assert share > 0.8 if kept else share < 0.05, (hz, share)
    # 8-bit mu-law keeps a tone quieter than one step of linear 8-bit coding (1/128: it would vanish)
    quiet = tone(1000) * 0.01
    assert band_power(A.telephone(quiet, RATE), 900, 1100) / band_power(quiet, 900, 1100) > 0.8


def test_vtlp_moves_a_formant_by_its_warp_and_keeps_the_band_edges():
    spectrum = torch.zeros(201, 3)
    spectrum[50] = 1.0
    for warp, moved in ((1.1, 55), (0.9, 45)):
        assert int(A.warp_spectrum(spectrum, warp)[:, 0].argmax()) == moved
        positions = A.vtlp_positions(201, warp)
        assert positions[0] == 0 and positions[-1] == 200 and (positions.diff() > 0).all()
    assert A.warp_spectrum(spectrum, 1.0) is spectrum


def test_log_mel_is_torchaudios_mel_spectrogram_unless_warped():
    """What the ONNX export's processing note tells users to compute, so training must compute it too."""
    x = tone(700, 0.5) + 0.01 * torch.randn(8000, generator=torch.Generator().manual_seed(0))
    features = LogMel(RATE, 80, 25, 10)(x)
    reference = (torchaudio.transforms.MelSpectrogram(RATE, n_fft=400, hop_length=160, n_mels=80)(x) + 1e-6).log().T
    torch.testing.assert_close(features, (reference - reference.mean(0)) / (reference.std(0) + 1e-5))
    assert len(features) == LogMel(RATE, 80, 25, 10).frames(len(x))
    assert not torch.equal(LogMel(RATE, 80, 25, 10)(x, warp=1.1), features)


def test_each_augmentation_is_drawn_at_its_rate_and_replays_from_its_seed(monkeypatch):
    cfg = default_augment()
    x = tone(500, 0.5)
    others = [tone(300, 0.3), tone(900, 0.7), tone(1200, 0.2)]
    first, warp = A.augment(x, cfg, RATE, torch.Generator().manual_seed(3), others)
    again, warp_again = A.augment(x, cfg, RATE, torch.Generator().manual_seed(3), others)
    assert torch.equal(first, again) and warp == warp_again
    off = {name: {**settings, "rate": 0.0} for name, settings in cfg.items()}
    assert A.augment(x, off, RATE, torch.Generator(), others) == (x, 1.0)

    calls = {name: 0 for name in ("speed", "reverberate", "coloured_noise", "babble", "telephone")}
    for name in calls:

        def counted(*args, name=name, original=getattr(A, name)):
            calls[name] += 1
            return original(*args)

        monkeypatch.setattr(A, name, counted)
    cfg = {**cfg, "speed": {"rate": 0.5, "factors": [0.9, 1.1]}}
    draws, warps = torch.Generator().manual_seed(0), 0
    for _ in range(400):
        warps += A.augment(x, cfg, RATE, draws, others)[1] != 1.0
    rates = {
        "speed": 0.5,
        "reverberate": cfg["reverb"]["rate"],
        "coloured_noise": cfg["noise"]["rate"],
        "babble": cfg["babble"]["rate"],
        "telephone": cfg["telephone"]["rate"],
    }
    for name, rate in rates.items():
        assert calls[name] / 400 == pytest.approx(rate, abs=0.08), name
    assert warps / 400 == pytest.approx(cfg["vtlp"]["rate"], abs=0.08)


def test_augmentation_settings_are_checked_before_any_data_is_read(capsys):
    code, _, err = tfkit(capsys, "train", "conformer", "--set", "augment.noise.colours=[white,purple]", "--max-steps", "1")
    assert code == 2
    one_error_line(err, "unknown noise colour 'purple' in augment.noise.colours (valid: white, pink, brown, blue)")
    code, _, err = tfkit(capsys, "train", "conformer", "--set", "augment.reverb.rate=1.5", "--max-steps", "1")
    assert code == 2
    one_error_line(err, "augment.reverb.rate")


# -- the built-in speech --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus():
    data = {
        **registry.get("recipe", "conformer").default_config()["data"],
        "train_size": 160,
        "validation_size": 8,
        "test_size": 24,
    }
    return speech.speech_corpus(data, 0)


def decoded(row: dict) -> torch.Tensor:
    return torch.from_numpy(soundfile.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")[0])


def test_built_in_speakers_cover_every_accent_and_test_voices_are_unseen(corpus):
    speakers = {split: corpus[split]["speaker"][:] for split in corpus}
    assert {s.split("+")[0] for s in speakers["train"]} == set(speech.ACCENTS)
    variants = {split: {s.partition("+")[2] for s in found} for split, found in speakers.items()}
    assert "" in variants["train"]  # the plain voices, as `espeak-ng` speaks by default, are training speakers
    assert not variants["train"] & (variants["validation"] | variants["test"])
    assert "" not in variants["test"]


def test_training_audio_is_clean_and_held_out_audio_is_noisy(corpus):
    """The loader adds training noise, drawn anew each epoch; validation and test carry it fixed."""
    silent = {split: [float((decoded(row) == 0).float().mean()) for row in corpus[split]] for split in ("train", "test")}
    assert sum(share > 0.05 for share in silent["train"]) > len(silent["train"]) / 2  # digital silence in the pauses
    assert max(silent["test"]) < 0.01


def test_the_held_out_channel_is_the_test_set_through_a_room_babble_and_a_loudspeaker(corpus):
    test, channel = corpus["test"], corpus["test_channel"]
    assert channel["text"][:] == test["text"][:] and channel["speaker"][:] == test["speaker"][:]
    for a, b in zip(test.select(range(4)), channel.select(range(4))):
        clean, played = decoded(a), decoded(b)
        assert len(clean) == len(played) and not torch.equal(clean, played)
        # the loudspeaker's band: little left above 5 kHz, where eSpeak has energy
        assert band_power(played, 7000, 8000) / band_power(played, 0, 8000) < 0.1 * band_power(clean, 7000, 8000) / band_power(
            clean, 0, 8000
        )


def test_evaluate_scores_the_held_out_channel_beside_the_test_split(capsys, tmp_path):
    from conftest import quiet
    from tfkit.train import start_training

    config = recipe_config("conformer", "train.steps=0", "data.train_size=40", "data.validation_size=8", "data.test_size=8")
    start_training(config, tmp_path / "run", torch.device("cpu"), console=quiet()).fit(progress=False)
    code, out, err = tfkit(capsys, "evaluate", str(tmp_path / "run"), "--json")
    assert code == 0, err
    assert set(json.loads(out)) == {"cer", "wer", "channel_cer", "channel_wer"}
    code, out, err = tfkit(capsys, "evaluate", str(tmp_path / "run"), "--split", "validation", "--json")
    assert set(json.loads(out)) == {"cer", "wer"}

"""The Conformer recipe: SpecAugment, subsampling, relative-position attention, the convolution module,
CTC decoding, learning on the built-in speech, predict and inspection on audio files."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

from conftest import one_error_line, quiet, recipe_config, straight_and_resumed_losses, tfkit
from tfkit import registry
from tfkit import run as runs
from tfkit.decode import ctc_greedy, ctc_prefix_beam_search
from tfkit.errors import UsageError
from tfkit.nn.attention import RelativePositionMultiHeadAttention
from tfkit.nn.conformer import ConformerBlock, ConvolutionModule, ConvolutionSubsampling, MaskedBatchNorm1d, frame_mask
from tfkit.nn.position import LearnedPosition, NoPosition, RotaryPosition, SinusoidalPosition, sinusoids_at
from tfkit.recipes.conformer import data as speech
from tfkit.recipes.conformer import recipe as recipe_module
from tfkit.recipes.conformer.augment import spec_augment
from tfkit.recipes.conformer.data import ctc_characters
from tfkit.recipes.conformer.model import pad_features
from tfkit.train import start_training


def conformer_config(*sets: str) -> dict:
    return recipe_config("conformer", *sets)


@pytest.fixture(scope="module")
def conformer_run(tmp_path_factory) -> object:
    # 700 steps: under the default augmentation 400 left the test CER at 27
    trainer = start_training(
        conformer_config("train.steps=700"), tmp_path_factory.mktemp("conformer") / "run", torch.device("cpu"), console=quiet()
    )
    trainer.fit(progress=False)
    return trainer.run_dir


# -- components -------------------------------------------------------------------------------------
def test_relative_position_attention_matches_an_explicit_reference():
    torch.manual_seed(0)
    d, heads, length = 16, 2, 6
    attention = RelativePositionMultiHeadAttention(d, heads).eval()
    x = torch.randn(2, length, d)
    mask = frame_mask(torch.tensor([6, 4]), length)[:, None, None]
    d_k = d // heads
    q, k, v = (t.view(2, length, heads, d_k).transpose(1, 2) for t in attention.in_proj(x).chunk(3, -1))
    expected = torch.zeros(2, heads, length, d_k)
    for b, h, i in itertools.product(range(2), range(heads), range(length)):
        scores = []
        for j in range(length):
            r = attention.pos_proj(sinusoids_at(torch.tensor([i - j]), d))[0].view(heads, d_k)[h]
            content = (q[b, h, i] + attention.content_bias[h, 0]) @ k[b, h, j]
            position = (q[b, h, i] + attention.position_bias[h, 0]) @ r
            scores.append((content + position) / math.sqrt(d_k) if mask[b, 0, 0, j] else torch.tensor(-math.inf))
        expected[b, h, i] = torch.stack(scores).softmax(0) @ v[b, h]
    expected = attention.out_proj(expected.transpose(1, 2).reshape(2, length, d))
    weights = (attention.position_bias, attention.pos_proj.weight, attention.in_proj.weight)
    probe = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * probe).sum(), weights)
    fast = attention(x, mask=mask)
    fast_grads = torch.autograd.grad((fast * probe).sum(), weights)  # through the strided shift
    with torch.no_grad():
        attention.attend.explicit = True
        explicit = attention(x, mask=mask)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(fast_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_subsampling_lengths_match_the_convolutions_and_ignore_padding():
    torch.manual_seed(0)
    subsampling = ConvolutionSubsampling(80, 32, 8).eval()
    lengths = torch.tensor([7, 8, 10, 11, 57, 100])
    assert ConvolutionSubsampling.output_lengths(lengths).tolist() == [1, 1, 1, 2, 13, 24]
    features = torch.randn(len(lengths), 100, 80)
    padded = features.masked_fill(~frame_mask(lengths, 100)[..., None], 0.0)
    batch, out_lengths = subsampling(padded, lengths)
    for row, n in enumerate(lengths.tolist()):
        alone, (m,) = subsampling(features[row : row + 1, :n], torch.tensor([n]))
        assert alone.size(1) == m == out_lengths[row]
        torch.testing.assert_close(batch[row, :m], alone[0], atol=1e-5, rtol=1e-5)
    assert frame_mask(torch.tensor([2, 0, 3]), 3).tolist() == [[True, True, False], [False, False, False], [True, True, True]]


def test_subsampling_is_espnets_conv2d_stack():
    """The first convolution runs as a product over patches and the second channels-last: same
    outputs and gradients as Conv2d → ReLU → Conv2d → ReLU → Linear over (channels × frequencies)."""
    torch.manual_seed(0)
    subsampling = ConvolutionSubsampling(23, 16, 6)
    features = torch.randn(3, 29, 23)
    out, _ = subsampling(features, torch.tensor([29, 20, 9]))
    conv = subsampling.conv(features[:, None])  # (B, C, T', F')
    expected = subsampling.proj(conv.transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), list(subsampling.parameters()))
    expected_grads = torch.autograd.grad((expected * weight).sum(), list(subsampling.parameters()))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_convolution_module_is_its_declared_layers():
    """The depthwise convolution runs as a 2-D one on the channels-last frames: same outputs and
    gradients as the declared Conv1d on (B, C, T)."""
    torch.manual_seed(0)
    module = ConvolutionModule(6, 5, dropout=0.0)
    x = torch.randn(3, 11, 6, requires_grad=True)
    mask = frame_mask(torch.tensor([11, 7, 4]), 11)
    out = module(x, mask)
    frames = F.glu(module.pointwise_in(x), dim=-1).masked_fill(~mask[..., None], 0.0)
    frames = module.depthwise(frames.transpose(1, 2)).transpose(1, 2)
    expected = module.pointwise_out(F.silu(module.norm(frames, mask)))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    inputs = [x, *module.parameters()]
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    for got, want in zip(grads, torch.autograd.grad((expected * weight).sum(), inputs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for got, parameter in zip(grads[1:], module.parameters()):
        assert got.stride() == parameter.stride()  # DDP's gradient buckets have the parameters' layout


def test_convolution_module_under_cpu_bf16_autocast_runs_small_batches():
    """oneDNN took over 15 minutes to build its bf16 kernel for the channels-last depthwise form at these
    sizes; in a subprocess, so that a hang fails the test instead of stalling the run."""
    code = """if True:
        import torch
        from tfkit.nn.conformer import ConvolutionModule
        torch.manual_seed(0)
        for batch, frames, channels in [(1, 110, 32), (1, 200, 144), (3, 110, 144)]:
            module, x = ConvolutionModule(channels, 15, dropout=0.0), torch.randn(batch, frames, channels)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(x)
            torch.testing.assert_close(out.float(), module(x), atol=0.1, rtol=0.05)
    """
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sizes_that_would_misalign_or_empty_the_frames_are_usage_errors():
    with pytest.raises(UsageError, match="kernel size must be odd"):
        ConvolutionModule(16, 8, 0.0)
    with pytest.raises(UsageError, match="at least 7 feature bins"):
        ConvolutionSubsampling(6, 16, 4)
    ConvolutionSubsampling(7, 16, 4)(torch.randn(1, 9, 7), torch.tensor([9]))  # 7 bins leave one


def test_a_conformer_block_compiles_to_one_graph():
    """torch.compile traces the whole block: the relative-position shift and the masked batch norm
    need no host values (dropout is off: on the CPU its masks are drawn eagerly, by design)."""
    block = ConformerBlock(16, 2, 32, dropout=0.0)
    mask = frame_mask(torch.tensor([9, 5]), 9)[:, None, None]
    explained = torch._dynamo.explain(block)(torch.randn(2, 9, 16), mask)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


def test_subsampling_compiles_for_lengths_that_change():
    """A training run's lengths change from batch to batch, so torch.compile turns them dynamic; on the
    CPU, Inductor failed on the channels-last view between the two convolutions."""
    torch.manual_seed(0)
    module = ConvolutionSubsampling(16, 8, 4)
    compiled = torch.compile(module, dynamic=True)
    for batch, frames in ((2, 40), (3, 57)):
        x = torch.randn(batch, frames, 16, requires_grad=True)
        lengths = torch.full((batch,), frames)
        (got, got_lengths), (want, want_lengths) = compiled(x, lengths), module(x, lengths)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert torch.equal(got_lengths, want_lengths)
        weight = torch.randn_like(want)
        grads = [torch.autograd.grad((out * weight).sum(), [x, *module.parameters()]) for out in (got, want)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_convolution_module_ignores_padded_frames_in_training_and_evaluation():
    torch.manual_seed(0)
    module = ConvolutionModule(8, 5, dropout=0.0)
    lengths = torch.tensor([9, 5])
    mask = frame_mask(lengths, 9)
    x = torch.randn(2, 9, 8)
    garbage = x.clone()
    garbage[1, 5:] = 100.0  # padding with large values must change nothing in real frames
    module.train()
    first = module(x, mask)
    second = module(garbage, mask)
    torch.testing.assert_close(first[mask], second[mask])
    module.eval()
    batched = module(x, mask)
    alone = module(x[1:, :5], None)
    torch.testing.assert_close(batched[1, :5], alone[0], atol=1e-5, rtol=1e-5)

    fresh = ConvolutionModule(8, 5, dropout=0.0).train()
    fresh(garbage, mask)
    with torch.no_grad():  # batch norm's running mean moved 10% toward the mean of the 14 real frames
        h = torch.nn.functional.glu(fresh.pointwise_in(x), -1).masked_fill(~mask[..., None], 0.0)
        h = fresh.depthwise(h.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(fresh.norm.running_mean, 0.1 * h[mask].mean(0))


@pytest.mark.parametrize("shift", [0.0, 300.0])  # a mean far from 0 must not cost the variance its digits
def test_masked_batch_norm_is_batch_norm_of_the_real_frames(shift):
    torch.manual_seed(0)
    x = (torch.randn(3, 6, 4) + shift).requires_grad_()
    mask = frame_mask(torch.tensor([6, 3, 1]), 6)
    ours, reference = MaskedBatchNorm1d(4), torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        reference.weight.uniform_()
        reference.bias.uniform_()
        ours.load_state_dict(reference.state_dict())
    for _ in range(2):  # the second step uses and moves the running statistics of the first
        poisoned = x.masked_fill(~mask[..., None], 1e4)  # padding never reaches the statistics
        out = ours(poisoned, mask)
        expected = reference(x[mask])
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
        torch.testing.assert_close(out[mask], expected, atol=1e-4, rtol=1e-4)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
        torch.testing.assert_close(grad, expected_grad, atol=1e-3, rtol=1e-3)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the statistics stay fp32 under autocast
        torch.testing.assert_close(ours(x, mask)[mask], reference(x[mask]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    ours.eval(), reference.eval()
    torch.testing.assert_close(ours(x, mask)[mask], reference(x[mask]))


def test_conformer_block_gives_each_utterance_the_same_output_alone_or_padded():
    torch.manual_seed(0)
    block = ConformerBlock(16, 2, 32, dropout=0.0, kernel_size=5).eval()
    lengths = torch.tensor([7, 4])
    mask = frame_mask(lengths, 7)[:, None, None]
    x = torch.randn(2, 7, 16)
    batched = block(x, mask)
    alone = block(x[1:, :4], frame_mask(torch.tensor([4]), 4)[:, None, None])
    torch.testing.assert_close(batched[1, :4], alone[0], atol=1e-5, rtol=1e-5)


def test_spec_augment_masks_within_bounds_and_only_in_training(monkeypatch):
    cfg = {"freq_masks": 2, "freq_width": 10, "time_masks": 3, "time_width": 40, "time_ratio": 0.05}
    torch.manual_seed(0)
    lengths = torch.tensor([600, 200, 50])
    features = (torch.randn(600, 80) + 5.0).expand(3, 600, 80).clone()  # no cell is 0 before masking
    masked = spec_augment(features, lengths, cfg)
    for row, length in enumerate(lengths.tolist()):
        zero = masked[row, :length] == 0
        bins, frames = zero.all(0), zero.all(1)
        assert torch.equal(zero, bins[None, :] | frames[:, None])  # whole bins and whole frames only
        assert bins.sum() <= 2 * 10
        assert frames.sum() <= 3 * min(40, int(0.05 * length))  # the cap follows each utterance's length
        assert torch.equal(masked[row, :length][~zero], features[row, :length][~zero])
    masked_bins = [tuple((masked[row, :50] == 0).all(0).tolist()) for row in range(3)]
    assert len(set(masked_bins)) > 1  # each utterance draws its own masks
    masked_any = [spec_augment(features, lengths, cfg).eq(0).any() for _ in range(20)]
    assert sum(masked_any) >= 15

    recipe = registry.get("recipe", "conformer")(
        conformer_config("data.train_size=20", "data.validation_size=4", "data.test_size=4")
    )
    recipe.prepare()
    everything = list(range(len(recipe.train_rows)))
    stored = recipe._train_samples(everything)
    batch = next(iter(recipe.train_batches(0)))
    assert (batch["features"] == 0).all(1).any()  # some bins are masked in training
    assert all(torch.equal(a, b) for a, b in zip(stored, recipe._train_samples(everything)))  # in a copy

    def refuse(*args):
        raise AssertionError("SpecAugment during evaluation")

    monkeypatch.setattr(recipe_module, "spec_augment", refuse)
    recipe.evaluate(recipe.build_model(), "validation")


# -- CTC decoding -----------------------------------------------------------------------------------
def test_ctc_greedy_merges_repeats_and_drops_blanks():
    # frames: a a _ a b b _  → "a a b"; the second utterance stops at its length
    paths = torch.tensor([[1, 1, 0, 1, 2, 2, 0], [2, 0, 0, 2, 1, 1, 1]])
    log_probs = torch.nn.functional.one_hot(paths, 3).float().log()
    assert ctc_greedy(log_probs, torch.tensor([7, 4])) == [[1, 1, 2], [2, 2]]


def test_ctc_characters_spend_fewer_labels_and_decode_exactly():
    """A word's first letter carries its boundary and a doubled letter is one label: "three three"
    is 8 CTC labels instead of 12 characters and a blank between each pair of e's."""
    rng = random.Random(0)
    texts = [speech.number_text(rng) for _ in range(500)]
    tokenizer = ctc_characters(texts, speech.SPECIALS)
    assert tokenizer.encode("three three").tokens == ["▁t", "h", "r", "ee", "▁t", "h", "r", "ee"]
    assert tokenizer.token_to_id("<blank>") == speech.BLANK
    vocabulary = set(tokenizer.get_vocab())
    assert {p for p in vocabulary if p.startswith("▁")} == {"▁", *(f"▁{w[0]}" for t in texts for w in t.split())}
    assert {p for p in vocabulary if len(p) == 2 and p[0] == p[1]} == {"ee"}
    labels = [e.ids for e in tokenizer.encode_batch(texts)]
    assert tokenizer.decode_batch(labels) == texts
    assert not any(a == b for row in labels for a, b in zip(row, row[1:]))  # no label waits on a blank for its twin
    assert sum(map(len, labels)) < 0.85 * sum(len(t) + 1 for t in texts)  # than letters and word boundaries


def exhaustive_best(log_probs: torch.Tensor) -> tuple[tuple[int, ...], float]:
    """Sum the probability of every frame path into its label sequence; the best sequence."""
    totals: dict[tuple[int, ...], float] = {}
    probs = log_probs.exp()
    for path in itertools.product(range(log_probs.size(1)), repeat=log_probs.size(0)):
        p = math.prod(probs[t, c].item() for t, c in enumerate(path))
        labels = tuple(c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1]))
        totals[labels] = totals.get(labels, 0.0) + p
    best = max(totals, key=totals.get)
    return best, totals[best]


def test_prefix_beam_search_sums_alignments_where_greedy_cannot():
    # greedy takes blank twice (0.36) but "a" owns three paths: 0.16 + 0.24 + 0.24
    log_probs = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()
    assert ctc_greedy(log_probs[None], torch.tensor([2])) == [[]]
    assert ctc_prefix_beam_search(log_probs, beam=2) == [1]
    torch.manual_seed(0)
    for _ in range(20):
        log_probs = (torch.randn(5, 4) * 2).log_softmax(-1)
        best, _ = exhaustive_best(log_probs)
        assert tuple(ctc_prefix_beam_search(log_probs, beam=64)) == best


# -- the recipe -------------------------------------------------------------------------------------
def test_tiny_conformer_learns_the_built_in_speech(conformer_run):
    records = [r for r in runs.read_metrics(conformer_run) if "loss" in r]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert {"▁t", "ee"} <= set(runs.read_tokenizer(conformer_run).get_vocab())  # ctc_characters
    recipe, model = runs.open_run(conformer_run)
    recipe.prepare(conformer_run)
    metrics = recipe.evaluate(model, "test")
    assert metrics["cer"] < 20, metrics  # measured 11.5 (WER 35) on unseen voices; an untrained model is near 100


def write_test_audio(run, tmp_path) -> tuple[list, list[str]]:
    recipe, _ = runs.open_run(run)
    corpus = speech.speech_corpus(recipe.config["data"], recipe.config["seed"])["test"]
    paths = []
    for i, (row, suffix) in enumerate(zip(corpus.select(range(2)), (".wav", ".flac"))):
        samples, rate = soundfile.read(__import__("io").BytesIO(row["audio"]["bytes"]), dtype="float32")
        paths.append(tmp_path / f"utterance{i}{suffix}")
        # a stereo 22.05 kHz WAV exercises mixing down and resampling
        if suffix == ".wav":
            import torchaudio

            stereo = torchaudio.functional.resample(torch.from_numpy(samples), rate, 22050).numpy()
            soundfile.write(paths[-1], np.stack([stereo, stereo], 1), 22050)
        else:
            soundfile.write(paths[-1], samples, rate)
    return paths, corpus["text"][:2]


def test_predict_on_wav_and_flac_and_bad_files(capsys, conformer_run, tmp_path):
    (wav, flac), texts = write_test_audio(conformer_run, tmp_path)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF" + b"\0" * 40)
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, dtype=np.float32), 16000)
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    click = tmp_path / "click.wav"  # one sample: shorter than the STFT's padding
    soundfile.write(click, np.ones(1, dtype=np.float32) * 0.5, 16000)
    long = tmp_path / "long.wav"  # over MAX_SECONDS (a low rate keeps the file small)
    soundfile.write(long, np.full(301 * 200, 0.1, dtype=np.float32), 200)
    nan = tmp_path / "nan.wav"  # a float WAV can hold NaN and Inf
    soundfile.write(
        nan, np.r_[np.full(8000, 0.1), [np.nan, np.inf], np.full(8000, 0.1)].astype(np.float32), 16000, subtype="FLOAT"
    )
    code, out, err = tfkit(
        capsys,
        "predict",
        str(conformer_run),
        str(wav),
        str(broken),
        str(empty),
        str(silent),
        str(click),
        str(long),
        str(nan),
        str(flac),
    )
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 6 and "Traceback" not in err
    assert "broken.wav: not a readable audio file" in errors[0]
    assert "empty.wav: the audio is empty" in errors[1] and "silent.wav: the audio is silent" in errors[2]
    assert "click.wav: the recording is too short to transcribe" in errors[3]
    assert "long.wav: the recording is 301 s long, more than the 300 s tfkit transcribes at once" in errors[4]
    assert "nan.wav: the audio holds 2 non-finite samples (NaN or Inf)" in errors[5]
    lines = [line.split("\t") for line in out.splitlines()]
    assert [line[0] for line in lines] == [str(wav), str(flac)]
    assert all(line[1].strip() for line in lines)
    code, out, err = tfkit(capsys, "predict", str(conformer_run), str(tmp_path))  # a folder: the same files, sorted
    assert code == 2 and [line.split("\t")[0] for line in out.splitlines()] == [str(wav), str(flac)]
    assert err.count("error: ") == 7 and "6 of 8 audio files could not be read" in err
    code, beam_out, _ = tfkit(capsys, "predict", str(conformer_run), str(flac), "--beam", "4")
    assert code == 0 and beam_out.split("\t")[0] == str(flac)
    code, _, err = tfkit(capsys, "predict", str(conformer_run), str(tmp_path / "missing.wav"))
    assert code == 2
    one_error_line(err, "missing.wav: no such file")


def test_inspect_attention_on_a_recording(capsys, conformer_run, tmp_path):
    (wav, _), _ = write_test_audio(conformer_run, tmp_path)
    out_dir = tmp_path / "attention"
    code, _, err = tfkit(capsys, "inspect-attention", str(conformer_run), str(wav), "--out", str(out_dir))
    assert code == 0, err
    weights = np.load(out_dir / "attention.npz")
    described = json.loads((out_dir / "tokens.json").read_text())
    frames = described["axes"]["frames"]
    assert set(weights.files) == {"encoder.layers.0.self_attn", "encoder.layers.1.self_attn"}
    assert weights["encoder.layers.0.self_attn"].shape == (4, len(frames), len(frames))
    np.testing.assert_allclose(weights["encoder.layers.1.self_attn"].sum(-1), 1.0, atol=1e-5)
    assert frames[:2] == ["0.00s", "0.04s"] and described["frame_seconds"] == 0.04
    names = {p.name for p in out_dir.glob("*.png")}
    assert names == {"spectrogram.png", "encoder.layers.0.self_attn.png", "encoder.layers.1.self_attn.png"}
    code, _, err = tfkit(capsys, "inspect-attention", str(conformer_run), str(tmp_path / "none.wav"))
    assert code == 2
    one_error_line(err, "none.wav: no such file")
    minute = tmp_path / "minute.wav"  # past what inspect-attention holds in memory, though predict reads it
    soundfile.write(minute, (0.1 * np.sin(np.arange(61 * 16000) / 10)).astype(np.float32), 16000)
    code, _, err = tfkit(capsys, "inspect-attention", str(conformer_run), str(minute), "--out", str(tmp_path / "minute"))
    assert code == 2
    one_error_line(
        err,
        "minute.wav: the recording is 61 s long; inspect-attention keeps every frame × frame map of every layer, so it reads at most 60 s",
    )


def test_the_onnx_export_transcribes_two_recordings_as_tfkit_does(capsys, conformer_run, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from tokenizers import Tokenizer

    code, _, err = tfkit(capsys, "export", str(conformer_run), str(tmp_path / "onnx"), "--to", "onnx")
    assert code == 0, err
    meta = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert meta["graphs"]["model"]["outputs"] == ["log_probs", "output_lengths"] and meta["n_mels"] == 80
    recipe, model = runs.open_run(conformer_run)
    paths, _ = write_test_audio(conformer_run, tmp_path)
    features = [recipe._log_mel()(speech.read_audio(p, None, meta["sample_rate"])) for p in paths]
    assert len(features[0]) != len(features[1])  # one is padded
    batch, lengths = pad_features(features)
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    log_probs, out_lengths = session.run(None, {"features": batch.numpy(), "lengths": lengths.numpy()})
    tokenizer = Tokenizer.from_file(str(tmp_path / "onnx" / meta["tokenizer"]))
    theirs = tokenizer.decode_batch(ctc_greedy(torch.from_numpy(log_probs), torch.from_numpy(out_lengths), meta["blank_id"]))
    ours = recipe.transcribe(model, features, beam=1)
    assert theirs == [ours[0], ours[1]] and all(theirs)


def test_evaluate_on_a_manifest_of_the_test_recordings_gives_the_built_in_figures(capsys, conformer_run, tmp_path):
    """The built-in test split written out as a user's files (FLAC and a manifest) scores as it does
    built in; the held-out channel is the built-in data's own, so --data reports CER and WER only."""
    recipe, _ = runs.open_run(conformer_run)
    corpus = speech.speech_corpus(recipe.config["data"], recipe.config["seed"])["test"]
    lines = []
    for i, row in enumerate(corpus):
        (tmp_path / f"{i}.flac").write_bytes(row["audio"]["bytes"])
        lines.append(json.dumps({"audio": f"{i}.flac", "text": row["text"]}) + "\n")
    (tmp_path / "test.jsonl").write_text("".join(lines))
    code, out, err = tfkit(capsys, "evaluate", str(conformer_run), "--json")
    assert code == 0, err
    built_in = json.loads(out)
    code, out, err = tfkit(capsys, "evaluate", str(conformer_run), "--data", str(tmp_path / "test.jsonl"), "--json")
    assert code == 0, err
    assert json.loads(out) == pytest.approx({"cer": built_in["cer"], "wer": built_in["wer"]}, abs=1e-9)


def test_user_manifest_trains_end_to_end_and_skips_unreadable_audio(capsys, conformer_run, tmp_path):
    (wav, flac), texts = write_test_audio(conformer_run, tmp_path)
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    soundfile.write(tmp_path / "blip.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 1600).astype(np.float32), 16000)
    good = [("utterance0.wav", texts[0]), ("utterance1.flac", texts[1])]
    unusable = [("broken.wav", "lost words"), ("blip.wav", "one hundred and seventy seven thousand")]
    for split, rows in (("train", good * 3 + unusable), ("validation", good), ("test", good)):
        (tmp_path / f"{split}.csv").write_text("audio,text\n" + "".join(f"{p},{t}\n" for p, t in rows))
    code, out, err = tfkit(
        capsys,
        "train",
        "conformer",
        "--data",
        str(tmp_path),
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
        "data.vocab_size=30",
        "--out",
        str(tmp_path / "run"),
    )
    assert code == 0, err
    assert runs.read_tokenizer(tmp_path / "run").get_vocab_size() == 30  # a BPE vocabulary, not characters
    assert "skipped 1 of the 8 recordings in the train data" in err and "broken.wav" in err
    assert "skipped 1 training utterances whose transcript has more tokens" in err  # 0.1 s: 2 frames, 39 letters
    # the training audio lives in an Arrow file in datasets' cache, read batch by batch, not in memory
    recipe = registry.get("recipe", "conformer")(runs.read_config(tmp_path / "run"))
    recipe.prepare(tmp_path / "run")
    assert recipe.train.cache_files and len(recipe.train_rows) == 8 - 2  # less the unusable and the unalignable
    assert next(recipe.train_batches(0))["features"].shape[-1] == 80
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "utterance0.wav", "sentence": "x"}\n' * 30)
    code, _, err = tfkit(capsys, "train", "conformer", "--data", str(bad), "--max-steps", "1")
    assert code == 2
    one_error_line(err, "no column 'audio'")


@pytest.mark.parametrize(
    "position, kind", [("sinusoidal", SinusoidalPosition), ("learned", LearnedPosition), ("rotary", RotaryPosition)]
)
def test_multi_head_attention_takes_each_position_where_it_acts(position, kind):
    """An absolute position is added to the subsampled frames, a rotary one rotates every block's
    queries and keys; either way a padded utterance gets the output it gets alone."""
    recipe = registry.get("recipe", "conformer")(conformer_config("model.attention=multi_head", f"model.position={position}"))
    recipe.imitate_builtin_data()
    torch.manual_seed(0)
    model = recipe.build_model().eval()
    placed = model.encoder.layers[0].self_attn.rotary if kind is RotaryPosition else model.position
    assert isinstance(placed, kind)
    if kind is LearnedPosition:  # a vector per 40 ms frame of the longest recording read (300 s)
        assert model.position.table.shape == (7499, 96)
    features = torch.randn(2, 120, 80)
    batched, _ = model(features, torch.tensor([120, 70]))
    alone, (n,) = model(features[1:, :70], torch.tensor([70]))
    torch.testing.assert_close(batched[1, :n], alone[0], atol=1e-4, rtol=1e-4)
    if kind is RotaryPosition:  # the model without its position computes something else: it was applied
        for layer in model.encoder.layers:
            layer.self_attn.rotary = None
    else:
        model.position = NoPosition()
    assert not torch.allclose(model(features, torch.tensor([120, 70]))[0], batched, atol=1e-4)


def test_multi_head_attention_with_rotary_positions_learns(tmp_path):
    """50 steps of a one-layer model on the tiny built-in speech (cached once for the module): finite
    losses that fall (measured 5.26 over the first 5 steps, 3.19 over the last 5)."""
    config = conformer_config(
        "model.attention=multi_head",
        "model.position=rotary",
        "train.steps=50",
        "train.warmup=10",
        "train.log_every=5",
        "train.batch_size=8",
        "model.layers=1",
        "model.d_model=64",
        "model.d_ff=128",
    )
    trainer = start_training(config, tmp_path / "run", torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    losses = [r["loss"] for r in runs.read_metrics(tmp_path / "run") if "lr" in r]
    assert len(losses) == 10 and all(math.isfinite(loss) for loss in losses)
    assert max(losses[-3:]) < 0.75 * losses[0], losses


def test_relative_attention_with_rotary_positions_is_refused_before_the_data(capsys, monkeypatch):
    def read(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(recipe_module, "load_splits", read)
    code, _, err = tfkit(capsys, "train", "conformer", "--set", "model.position=rotary")
    assert code == 2
    one_error_line(
        err,
        "model.position 'rotary' with model.attention 'relative_multi_head': relative_multi_head attention has "
        "relative positions of its own",
    )
    code, _, err = tfkit(capsys, "train", "conformer", "--set", "model.attention=scaled_dot_product")
    assert code == 2
    one_error_line(err, "config key 'model.attention': unknown attention 'scaled_dot_product'")


def test_conformer_resumes_exactly(tmp_path):
    """SpecAugment draws random numbers and batch norm keeps running statistics: both must resume."""
    config = conformer_config(
        "train.steps=6",
        "train.log_every=1",
        "train.batch_size=8",
        "model.layers=1",
        "model.d_model=32",
        "model.d_ff=64",
        "model.drop_path=0.1",
    )
    straight, resumed = straight_and_resumed_losses(config, tmp_path)
    assert straight == resumed and len(straight) == 6


def test_hub_split_names_map_onto_train_validation_test(monkeypatch):
    """librispeech_asr names its splits train.100, validation, test: data.splits maps them."""
    import datasets

    from tfkit.data import load_splits

    rows = {name: datasets.Dataset.from_dict({"text": [name] * 30}) for name in ("train.100", "train.360", "validation", "test")}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config: datasets.DatasetDict(rows))
    splits = load_splits("librispeech_asr", lambda: None, 0, hub_config="clean", split_names={"train": "train.100"})
    assert {s: splits[s]["text"][0] for s in splits} == {"train": "train.100", "validation": "validation", "test": "test"}

"""The Conformer-CTC model as ONNX: one graph from features to CTC log-probabilities, and the
processing a user must do around it (features in, greedy CTC out). No transformers class matches
the model (relative-position attention, macaron feed-forwards, convolution modules)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tfkit.nn.conformer import frame_mask
from tfkit.onnx import Graph
from tfkit.recipes.conformer.data import BLANK


def onnx_graphs(model: nn.Module, n_mels: int) -> list[Graph]:
    """Normalised log-mel features (B, T, n_mels), zero after each utterance's length, and the
    lengths → CTC log-probabilities (B, T', vocabulary) and their lengths T'."""

    def example(batch: int, length: int) -> dict[str, Tensor]:
        frames = 16 * length  # the lengths Graph checks at are token counts: 80 to 176 frames here
        lengths = torch.linspace(frames, frames * 0.6, batch).long()  # padded rows, so the masks matter
        features = torch.randn(batch, frames, n_mels, generator=torch.Generator().manual_seed(batch * 1000 + length))
        return {"features": features * frame_mask(lengths, frames)[..., None], "lengths": lengths}

    return [
        Graph(
            "model",
            model,
            example,
            ["log_probs", "output_lengths"],
            {"features": {0: "batch", 1: "frames"}, "lengths": {0: "batch"}},
            limits={"frames": {"min": 16}},
        )
    ]  # the two stride-2 convolutions leave 3 frames


def onnx_processing(data: dict[str, Any], features: dict[str, Any]) -> dict[str, Any]:
    """What onnx.json says besides the tokenizer: the feature settings and how to read the outputs."""
    return {
        "sample_rate": data["sample_rate"],
        "n_mels": features["n_mels"],
        "window_ms": features["window_ms"],
        "hop_ms": features["hop_ms"],
        "blank_id": BLANK,
        "lowercase": data["lowercase"],
        "inputs": "features: mono audio at sample_rate, torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=window, "
        "hop_length=hop, n_mels) with window and hop the milliseconds in samples, log(x + 1e-6), then each "
        "mel bin less its mean over the utterance, divided by its standard deviation + 1e-5; zero-padded to "
        "the longest in the batch, with lengths its real frames",
        "outputs": "log_probs (B, T', V): per 40 ms frame; greedy CTC: the best id per frame up to output_lengths, "
        "repeats merged, blank_id removed, the rest decoded by tokenizer.json",
    }

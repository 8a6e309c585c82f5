"""The Conformer-CTC model (Gulati et al., 2020; Graves et al., 2006) and the features it reads.

Normalised log-mel frames go through convolution subsampling to 40 ms frames, a position (none by
default: relative-position attention places frames itself), a stack of Conformer blocks whose
attention is any registry attention, and a linear CTC head.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import Tensor, nn

from tfkit.errors import UsageError
from tfkit.nn.blocks import Encoder
from tfkit.nn.conformer import ConvolutionSubsampling, frame_mask
from tfkit.nn.position import build_position
from tfkit.recipes.conformer.augment import warp_spectrum


class LogMel(nn.Module):
    """Log-mel spectrogram (T, n_mels), each bin normalised to zero mean and unit variance over the utterance."""

    def __init__(self, sample_rate: int, n_mels: int, window_ms: float, hop_ms: float):
        super().__init__()
        window, hop = round(sample_rate * window_ms / 1000), round(sample_rate * hop_ms / 1000)
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=window, hop_length=hop, n_mels=n_mels)

    def frames(self, samples: int) -> int:
        """How many feature frames ``samples`` samples make (the STFT is centred)."""
        return 0 if samples <= self.mel.n_fft // 2 else 1 + samples // self.mel.hop_length

    @torch.no_grad()
    def forward(self, samples: Tensor, warp: float = 1.0) -> Tensor:
        """``warp`` other than 1 stretches the frequency axis before the mel filters (VTLP, training only)."""
        if not self.frames(len(samples)):  # shorter than the STFT's reflect padding: no frames at all
            return samples.new_zeros(0, self.mel.n_mels)
        power = warp_spectrum(self.mel.spectrogram(samples), warp)  # MelSpectrogram is these two steps
        features = (self.mel.mel_scale(power) + 1e-6).log().T
        return (features - features.mean(0)) / (features.std(0) + 1e-5)


def pad_features(features: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Utterances' (T, F) features as one zero-padded batch (B, T, F) and their lengths."""
    lengths = torch.tensor([len(f) for f in features])
    out = features[0].new_zeros(len(features), int(lengths.max()), features[0].size(1))
    for i, f in enumerate(features):
        out[i, : len(f)] = f
    return out, lengths


class ConformerCTC(nn.Module):
    """``position`` is a registry position over the subsampled frames, up to ``max_frames`` of them
    (what a learned table holds): one that acts on the input frames is applied to them, a rotary one
    is handed to every block's self-attention."""

    def __init__(
        self,
        features: int,
        vocab_size: int,
        subsampling_channels: int,
        d_model: int,
        heads: int,
        d_ff: int,
        layers: int,
        kernel_size: int,
        dropout: float,
        drop_path: float,
        activation: str,
        attention: str,
        position: str = "none",
        max_frames: int = 7500,
    ):
        super().__init__()
        self.subsampling = ConvolutionSubsampling(features, d_model, subsampling_channels, dropout)
        self.position, rotary = build_position(position, d_model, heads, max_frames)
        try:
            self.encoder = Encoder(
                "conformer",
                layers,
                d_model,
                heads,
                d_ff,
                dropout,
                activation,
                rotary=rotary,
                drop_path=drop_path,
                attention=attention,
                kernel_size=kernel_size,
            )
        except UsageError as e:  # relative_multi_head refuses a rotary position: name the keys that chose them
            raise UsageError(f"model.position {position!r} with model.attention {attention!r}: {e}") from None
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, F) features and lengths → CTC log-probabilities (B, T/4, V) and their lengths."""
        x, lengths = self.subsampling(features, lengths)
        x = self.encoder(self.position(x), frame_mask(lengths, x.size(1))[:, None, None])
        return self.head(x).float().log_softmax(-1), lengths

"""Conformer pieces (Gulati et al., 2020): convolution subsampling, the convolution module, the block.

Speech batches are padded, so every piece that mixes frames takes the frame mask (B, T), True on real
frames: the depthwise convolution sees zeros past the end of each utterance, and batch norm takes its
statistics from real frames only, so an utterance's output does not depend on what it is batched with.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tfkit import distributed
from tfkit.errors import UsageError
from tfkit.nn.blocks import DropPath, Parts
from tfkit.nn.dropout import Dropout
from tfkit.nn.linear import Linear
from tfkit.registry import register


def frame_mask(lengths: Tensor, total: int) -> Tensor:
    """(B,) lengths → (B, total) boolean mask, True on the first ``length`` frames."""
    return torch.arange(total, device=lengths.device)[None, :] < lengths[:, None]


class ConvolutionSubsampling(nn.Module):
    """Convolution subsampling: 4× fewer frames through two 3×3 stride-2 Conv2d with ReLU.

    The convolutions run over (time, frequency); channels × remaining frequencies are then projected
    to d_model (ESPnet's Conv2dSubsampling)."""

    def __init__(self, features: int, d_model: int, channels: int, dropout: float = 0.0):
        super().__init__()
        if features < 7:
            raise UsageError(
                f"convolution subsampling needs at least 7 feature bins to leave one after two 3×3 "
                f"stride-2 convolutions, got {features}"
            )
        # in place: a fresh (B, C, T/2, F/2) output per ReLU costs more in page faults than the ReLU.
        # forward() runs the layers one by one; the Sequential keeps ESPnet's parameter names (conv.0, conv.2).
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, 2), nn.ReLU(inplace=True)
        )
        self.proj = Linear(channels * (((features - 1) // 2 - 1) // 2), d_model)
        self.dropout = Dropout(dropout)

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        """Frames left after both convolutions; each uses only real input frames (no padding)."""
        return ((lengths - 1) // 2 - 1) // 2

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, F) features and their lengths → (B, T', d_model) and the new lengths."""
        first, relu, second, _ = self.conv
        if torch.compiler.is_exporting():  # a graph has no layouts to win, and the plain convolution keeps frames symbolic
            x = self.proj(relu(second(relu(first(features[:, None])))).permute(0, 2, 1, 3).flatten(2))
            return self.dropout(x), self.output_lengths(lengths)
        # One input channel makes the first convolution a (9 -> C) product over the 3×3 patches. That
        # takes half mkldnn's time, and the output comes out channels-last, the layout in which mkldnn
        # runs the second convolution about 1.5× faster (forward and backward; cuDNN is unmeasured).
        patches = features.unfold(1, 3, 2).unfold(2, 3, 2)  # (B, T', F', 3, 3)
        # a contiguous (9, C) weight makes autograd take the weight gradient as patchesᵀ·grad, which MKL
        # runs 4× faster than the (gradᵀ·patches)ᵀ it picks to match a transposed weight's layout
        weight = first.weight.flatten(1).t().contiguous()
        x = relu(torch.addmm(first.bias, patches.reshape(-1, 9), weight))
        x = x.view(*patches.shape[:3], -1).permute(0, 3, 1, 2)  # (B, C, T', F'), channels-last in memory
        if torch.compiler.is_compiling():
            # Inductor picks its own layouts, and on CPU this channels-last view makes it fail
            # ("cannot determine truth value of Relational") once lengths become dynamic
            x = x.contiguous()
        x = self.proj(relu(second(x)).permute(0, 2, 1, 3).flatten(2))
        return self.dropout(x), self.output_lengths(lengths)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """Batch norm over (B, T, C) whose batch statistics come from the real frames only; padded
    frames come out as zeros.

    The statistics are masked sums, not a gather of the real frames: boolean indexing waits for the
    device to count the frames (a GPU sync per call) and breaks torch.compile's graph. In training
    under torchrun the sums are over all ranks (as SyncBatchNorm's, which runs on GPUs only), so N
    ranks normalise as one process would."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            return super().forward(x.transpose(1, 2)).transpose(1, 2)
        padded = ~mask[..., None]  # (B, T, 1)
        if not self.training and self.track_running_stats:  # the running statistics, frame by frame
            return super().forward(x.transpose(1, 2)).transpose(1, 2).masked_fill(padded, 0.0)
        summed = distributed.sum_over_ranks if dist.is_initialized() else lambda t: t
        channels, values = x.size(-1), x.float()
        keep = mask.reshape(1, -1).to(values.dtype)  # sums over real frames as (1, B·T) @ (B·T, C) products
        with torch.autocast(x.device.type, enabled=False):  # in fp32: autocast would round the sums to bf16
            totals = summed(torch.cat([(keep @ values.reshape(-1, channels))[0], keep.sum().reshape(1)]))
            n = totals[channels]
            mean = totals[:channels] / n
            # two passes, mean then squared deviations: one pass (Σx² − n·mean²) loses digits when |mean| ≫ std
            deviation = values - mean
            var = summed((keep @ deviation.square().reshape(-1, channels))[0]) / n  # biased, as batch norm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).to(self.running_var.dtype), momentum)
        scale = torch.rsqrt(var + self.eps)
        out = torch.addcmul(self.bias, deviation, scale * self.weight) if self.affine else deviation * scale
        return out.masked_fill(padded, 0.0).to(x.dtype)


class ConvolutionModule(nn.Module):
    """Pointwise conv → GLU → depthwise conv → batch norm → Swish → pointwise conv → dropout."""

    def __init__(self, d_model: int, kernel_size: int, dropout: float):
        super().__init__()
        if kernel_size % 2 == 0:
            raise UsageError(f"the depthwise kernel size must be odd to keep frames aligned, got {kernel_size}")
        self.pointwise_in = Linear(d_model, 2 * d_model)  # a 1×1 convolution on (B, T, C)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)
        self.norm = MaskedBatchNorm1d(d_model)
        self.pointwise_out = Linear(d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = F.glu(self.pointwise_in(x), dim=-1)
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)  # padded frames must not leak into real ones
        x = F.silu(self.norm(self._depthwise(x), mask))
        return self.dropout(self.pointwise_out(x))

    def _depthwise(self, x: Tensor) -> Tensor:
        """The depthwise convolution over the frames of (B, T, C)."""
        depthwise = self.depthwise
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            # the form below is measured for fp32 on CPU only: under bf16, oneDNN takes minutes to generate
            # its kernel at some batches of 1 to 3 utterances, and cuDNN has not been measured on it
            return depthwise(x.transpose(1, 2)).transpose(1, 2)
        # (B, T, C) is channels-last: a 2-D convolution runs on its (B, C, 1, T) view as it lies, where
        # Conv1d would take mkldnn's channels-first depthwise kernel (10× slower forward, 2× with backward).
        # The weight as a view(), not [:, :, None]: its gradient then keeps the weight's strides, as
        # DDP's gradient buckets expect (an unsqueezed weight's gradient has others on the size-1 axis).
        weight = depthwise.weight.view(depthwise.out_channels, 1, 1, -1)
        padding = (0, depthwise.padding[0])
        x = F.conv2d(x.transpose(1, 2)[:, :, None], weight, depthwise.bias, padding=padding, groups=depthwise.groups)
        return x.squeeze(2).transpose(1, 2)


@register("block", "conformer")
class ConformerBlock(nn.Module):
    """The macaron Conformer block: ½ FFN → self-attention → convolution module → ½ FFN → LayerNorm.

    Each sublayer is pre-normed with its own residual; the feed-forward residuals are halved."""

    role = "encoder"
    norm_first = False  # the block ends with its own norm
    parts = Parts(attention="relative_multi_head")
    bias = True

    def __init__(
        self,
        d_model: int,
        heads: int,
        d_ff: int,
        dropout: float = 0.1,
        activation: str = "swish",
        parts: Parts | None = None,
        rotary: nn.Module | None = None,
        drop_path: float = 0.0,
        kernel_size: int = 31,
    ):
        super().__init__()
        parts = parts or self.parts
        self.norm_ff1 = parts.norm_layer(d_model)
        self.ff1 = parts.feed_forward_layer(d_model, d_ff, dropout, activation, self.bias)
        self.norm_attn = parts.norm_layer(d_model)
        self.self_attn = parts.attention_layer(d_model, heads, dropout, self.bias, rotary, "self")
        self.norm_conv, self.conv = parts.norm_layer(d_model), ConvolutionModule(d_model, kernel_size, dropout)
        self.norm_ff2 = parts.norm_layer(d_model)
        self.ff2 = parts.feed_forward_layer(d_model, d_ff, dropout, activation, self.bias)
        self.norm_out = parts.norm_layer(d_model)
        self.dropout = Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` is the attention mask (B, 1, 1, T); its last axis is the frame mask."""
        frames = None if mask is None else mask[:, 0, 0]

        def branch(sublayer_output: Tensor) -> Tensor:
            return self.drop_path(self.dropout(sublayer_output))

        x = x + 0.5 * branch(self.ff1(self.norm_ff1(x)))
        x = x + branch(self.self_attn(self.norm_attn(x), mask=mask))
        x = x + self.drop_path(self.conv(self.norm_conv(x), frames))  # the module ends with its own dropout
        x = x + 0.5 * branch(self.ff2(self.norm_ff2(x)))
        return self.norm_out(x)

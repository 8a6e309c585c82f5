"""The Conformer-CTC recipe's hooks: prepare the speech (:mod:`.data`), batch it with augmentation
(:mod:`.augment`), the CTC loss, greedy and prefix beam search decoding, CER and WER, transcripts of
recordings and the attention over their frames.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from tfkit import config as configs
from tfkit.data import (
    derive_seed,
    length_buckets,
    list_column,
    load_splits,
    require_columns,
    seeded_generator,
    seeded_global_rng,
    train_bpe,
)
from tfkit.decode import ctc_greedy, ctc_prefix_beam_search
from tfkit.errors import UsageError
from tfkit.inspect import draw_heads, figure_panels, save_figure
from tfkit.nn.conformer import ConvolutionSubsampling
from tfkit.onnx import Graph
from tfkit.recipe import (
    AttentionExample,
    Batch,
    Loss,
    TokenizerRecipe,
    batch_ranges,
    for_each_file,
)
from tfkit.recipes.conformer import interop
from tfkit.recipes.conformer.augment import COLOURS, augment, spec_augment
from tfkit.recipes.conformer.data import (
    AUDIO_SUFFIXES,
    BLANK,
    MAX_SECONDS,
    SPECIALS,
    ctc_characters,
    featurise,
    number_text,
    read_audio,
    speech_corpus,
    stored_features,
)
from tfkit.recipes.conformer.model import ConformerCTC, LogMel, pad_features
from tfkit.registry import register

MAX_INSPECT_SECONDS = 60  # inspect-attention keeps every layer's maps: 1,500 frames, 36 MB a layer of 4 heads


def error_rate(hypotheses: list[list[str]], references: list[list[str]]) -> float:
    """Edits (substitutions, insertions, deletions) per reference unit, in percent."""
    edits = sum(torchaudio.functional.edit_distance(r, h) for h, r in zip(hypotheses, references))
    return 100.0 * edits / max(1, sum(map(len, references)))


def draw_spectrogram(spectrogram: np.ndarray, seconds_per_frame: float, title: str, path: Path) -> None:
    """A (bins, frames) spectrogram with time in seconds across."""
    fig, (ax,) = figure_panels(1, 4.0, title)
    fig.set_size_inches(min(16.0, max(6.0, spectrogram.shape[1] / 40)), 3.5)
    extent = (0, spectrogram.shape[1] * seconds_per_frame, 0, spectrogram.shape[0])
    ax.imshow(spectrogram, origin="lower", aspect="auto", cmap="magma", extent=extent)
    ax.set_xlabel("seconds")
    ax.set_ylabel("mel bin")
    save_figure(fig, path)


@register("recipe", "conformer")
class Conformer(TokenizerRecipe):
    """Conformer-CTC speech recognition: log-mel, SpecAugment, relative-position attention, CER/WER."""

    config_file = "conformer.yaml"
    minimised = ("cer", "wer")
    ranges = configs.ranges(
        (*configs.AT_LEAST_1, ("kernel_size", "subsampling_channels", "n_mels", "sample_rate", "window_ms", "hop_ms", "voices")),
        (*configs.OFF_AT_0, ("freq_masks", "freq_width", "time_masks", "time_width")),
        (*configs.AT_LEAST_0, ("pause_s",)),
        (*configs.POSITIVE, ("factors", "rt60_s", "warp")),
        (*configs.PROBABILITY, ("time_ratio", "rate")),
    )
    BUILTIN_SIZES = {"train.steps": 2000}
    unit = "frame"

    def prepare(self, run_dir: Path | None = None) -> None:
        data, seed = self.config["data"], self.config["seed"]
        for colour in self.config["augment"]["noise"]["colours"]:
            if colour not in COLOURS:
                raise UsageError(f"unknown noise colour '{colour}' in augment.noise.colours (valid: {', '.join(COLOURS)})")
        splits = load_splits(
            data["name"], lambda: speech_corpus(data, seed), seed, hub_config=data["hub_config"], split_names=data["splits"]
        )
        for split, rows in splits.items():
            require_columns(rows, split, [data["audio_column"], data["text_column"]], "data.audio_column and data.text_column")
        # validation and test features are held in memory; the training split's audio goes into an
        # Arrow table (in datasets' cache when it comes from files), read batch by batch and augmented
        # there, so a corpus of any size costs memory only for its transcripts and lengths
        features, log_mel = self.config["features"], self._log_mel()
        self.train = featurise(splits["train"], "train", data, features, log_mel)
        self.train_table = self.train.with_format("arrow", columns=["samples"])  # once: with_format deep-copies
        # the built-in test set is scored twice: as it is, and through a channel training never drew
        scored = {"validation": [("", "validation")], "test": [("", "test"), ("channel_", "test_channel")]}
        self.texts, self.features, self.parts = {}, {}, {}
        for split, sources in scored.items():
            self.texts[split], self.features[split], self.parts[split] = [], [], []
            for prefix, source in (pair for pair in sources if pair[1] in splits):
                held = featurise(splits[source], source, data, features, log_mel)
                self.texts[split] += held["text"][:]
                self.features[split] += stored_features(held.with_format("arrow")[:], features["n_mels"])
                self.parts[split].append((prefix, len(held)))
        frames, texts = self.train["frames"][:], self.train["text"][:]  # lists: a Column reads Arrow item by item
        self.train_rows = [i for i, n in enumerate(frames) if n > 0]
        texts = [texts[i] for i in self.train_rows]
        if run_dir is not None:
            self.load(run_dir)
        else:
            self.tokenizer = (
                train_bpe(texts, data["vocab_size"], SPECIALS) if data["vocab_size"] else ctc_characters(texts, SPECIALS)
            )
        self.labels = [e.ids for e in self.tokenizer.encode_batch(texts)]
        self._drop_unalignable([frames[i] for i in self.train_rows])
        self.settle_steps(len(self.train_rows))

    def imitate_builtin_data(self) -> None:
        rng = random.Random(0)
        self.tokenizer = ctc_characters([number_text(rng) for _ in range(1000)], SPECIALS)

    def _drop_unalignable(self, frames: list[int]) -> None:
        """CTC needs at least one output frame per label, also when the utterance is played at the
        fastest speed augmentation draws: shorter training utterances are dropped."""
        speed = self.config["augment"]["speed"]
        fastest = max(speed["factors"]) if speed["rate"] > 0 else 1.0
        outputs = ConvolutionSubsampling.output_lengths((torch.tensor(frames) / fastest).long()).tolist()
        keep = [i for i, (n, label) in enumerate(zip(outputs, self.labels)) if len(label) <= n]
        if len(keep) < len(outputs):
            print(
                f"warning: skipped {len(outputs) - len(keep)} training utterances whose transcript has more "
                f"tokens than the utterance has 40 ms frames (at speed {fastest:g})",
                file=sys.stderr,
            )
            if not keep:
                raise UsageError("no training utterance is long enough for its transcript")
        self.train_rows, self.labels = [self.train_rows[i] for i in keep], [self.labels[i] for i in keep]
        self.train_frames = [frames[i] for i in keep]

    def _train_samples(self, rows: list[int]) -> list[Tensor]:
        """Audio of training utterances (positions in ``train_rows``), read from the Arrow table."""
        values, bounds = list_column(self.train_table[[self.train_rows[i] for i in rows]], "samples")
        audio = values.float() / 32768
        return [audio[start:end] for start, end in zip(bounds, bounds[1:])]

    def _log_mel(self) -> LogMel:
        f = self.config["features"]
        return LogMel(self.config["data"]["sample_rate"], f["n_mels"], f["window_ms"], f["hop_ms"])

    def build_model(self) -> nn.Module:
        m, hop_ms = self.config["model"], self.config["features"]["hop_ms"]
        longest = ConvolutionSubsampling.output_lengths(MAX_SECONDS * 1000 // hop_ms)  # frames a learned position holds
        return ConformerCTC(
            self.config["features"]["n_mels"],
            self.tokenizer.get_vocab_size(),
            m["subsampling_channels"],
            m["d_model"],
            m["heads"],
            m["d_ff"],
            m["layers"],
            m["kernel_size"],
            m["dropout"],
            m["drop_path"],
            m["activation"],
            m["attention"],
            m["position"],
            longest,
        )

    # -- training ---------------------------------------------------------------------------------
    def train_batches(self, epoch: int) -> Iterator[Batch]:
        seed = self.config["seed"]
        generator = seeded_generator(seed, epoch)
        # each pool of 50 batches is sorted by length: a few percent padding instead of ~60%
        log_mel, rate = self._log_mel(), self.config["data"]["sample_rate"]
        for b, rows in enumerate(length_buckets(self.train_frames, self.config["train"]["batch_size"], generator, pool=50)):
            batch_seed = derive_seed(seed, epoch, b)
            draws = torch.Generator().manual_seed(batch_seed)  # the augmentations', utterance by utterance
            audio = self._train_samples(rows)
            features = [
                log_mel(*augment(samples, self.config["augment"], rate, draws, audio[:i] + audio[i + 1 :]))
                for i, samples in enumerate(audio)
            ]
            with seeded_global_rng(batch_seed):  # torchaudio's masks
                batch, lengths = pad_features(features)
                batch = spec_augment(batch, lengths, self.config["specaugment"])
            labels = [torch.tensor(self.labels[i]) for i in rows]
            targets = pad_sequence(labels, batch_first=True, padding_value=BLANK)  # (B, S): one row per utterance
            yield {
                "features": batch,
                "lengths": lengths,
                "targets": targets,
                "target_lengths": torch.tensor([len(t) for t in labels]),
            }

    def loss(self, model: nn.Module, batch: Batch) -> Loss:
        """CTC loss per target token (summed over the batch, divided by its tokens); counts frames."""
        log_probs, lengths = model(batch["features"], batch["lengths"])
        total = F.ctc_loss(
            log_probs.transpose(0, 1),
            batch["targets"],
            lengths,
            batch["target_lengths"],
            blank=BLANK,
            reduction="sum",
            zero_infinity=True,
        )
        return Loss([(total, int(batch["target_lengths"].sum()))], int(batch["lengths"].sum()))

    # -- using the model --------------------------------------------------------------------------
    @torch.no_grad()
    def transcribe(
        self, model: nn.Module, features: list[Tensor], beam: int | None = None, rank: int = 0, world: int = 1
    ) -> dict[int, str]:
        """Transcripts keyed by the features' places; length-sorted batches (of them, process ``rank``
        of ``world`` decodes its share: :func:`batch_ranges`), greedy (beam 1) or prefix beam search."""
        decode = self.config["decode"]
        beam = beam or decode["beam"]
        device = next(model.parameters()).device
        model.eval()
        order = sorted(range(len(features)), key=lambda i: len(features[i]))
        out: dict[int, str] = {}
        for places in batch_ranges(len(order), decode["batch_size"], rank, world):
            rows = order[places.start : places.stop]
            batch, lengths = pad_features([features[i] for i in rows])
            log_probs, out_lengths = model(batch.to(device), lengths.to(device))
            if beam == 1:
                ids = ctc_greedy(log_probs, out_lengths, BLANK)
            else:
                ids = [ctc_prefix_beam_search(lp[:n], beam, BLANK) for lp, n in zip(log_probs, out_lengths.tolist())]
            out.update(zip(rows, self.tokenizer.decode_batch(ids)))
        return out

    def eval_outputs(
        self, model: nn.Module, split: str, rank: int = 0, world: int = 1, beam: int | None = None
    ) -> dict[int, str]:
        return self.transcribe(model, self.features[split], beam, rank, world)

    def score(self, split: str, hyps: list[str]) -> dict[str, float]:
        """CER and WER; on the built-in test set also channel_cer and channel_wer, of its copy through
        the held-out channel."""
        metrics, start = {}, 0
        for prefix, count in self.parts[split]:
            part, refs = hyps[start : start + count], self.texts[split][start : start + count]
            start += count
            metrics[f"{prefix}cer"] = error_rate([list(h) for h in part], [list(r) for r in refs])
            metrics[f"{prefix}wer"] = error_rate([h.split() for h in part], [r.split() for r in refs])
        return metrics

    def predict_file(self, model: nn.Module, path: Path, out: TextIO, beam: int | None = None) -> None:
        """One line per recording: path, a tab, the transcript. A folder is transcribed file by file;
        unreadable, empty or silent ones are reported and the rest still come out."""
        for_each_file(
            path,
            AUDIO_SUFFIXES,
            "audio files",
            lambda audio: out.write(f"{audio}\t{self._transcribe_file(model, audio, beam)}\n"),
        )

    def _transcribe_file(self, model: nn.Module, path: Path, beam: int | None) -> str:
        features = self._log_mel()(read_audio(path, None, self.config["data"]["sample_rate"]))
        if ConvolutionSubsampling.output_lengths(torch.tensor(len(features))) < 1:
            raise UsageError(f"{path}: the recording is too short to transcribe ({len(features)} frames)")
        return self.transcribe(model, [features], beam)[0]

    def export_hf(self, model: nn.Module, out: Path) -> None:
        raise UsageError(
            "no transformers class matches the Conformer-CTC model (relative-position attention, macaron "
            "feed-forwards, convolution modules)"
        )

    def onnx_graphs(self, model: nn.Module) -> list[Graph]:
        return interop.onnx_graphs(model, self.config["features"]["n_mels"])

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        return {**super().onnx_processing(out), **interop.onnx_processing(self.config["data"], self.config["features"])}

    def attention_example(self, model: nn.Module, text: str) -> AttentionExample:
        path = Path(text)
        features = self._log_mel()(read_audio(path, None, self.config["data"]["sample_rate"]))
        device = next(model.parameters()).device
        model.eval()
        frames = int(ConvolutionSubsampling.output_lengths(torch.tensor(len(features))))
        if frames < 1:
            raise UsageError(f"{path}: the recording is too short to inspect ({len(features)} frames)")
        seconds = 4 * self.config["features"]["hop_ms"] / 1000  # one encoder frame after 4× subsampling
        if frames * seconds > MAX_INSPECT_SECONDS:
            raise UsageError(
                f"{path}: the recording is {frames * seconds:.0f} s long; inspect-attention keeps every frame × frame "
                f"map of every layer, so it reads at most {MAX_INSPECT_SECONDS} s (cut out the part to look at)"
            )
        times = [f"{t * seconds:.2f}s" for t in range(frames)]
        transcript = self.transcribe(model, [features])[0]

        def draw(weights: dict[str, np.ndarray], out_dir: Path) -> None:
            draw_spectrogram(
                features.T.numpy(),
                self.config["features"]["hop_ms"] / 1000,
                f"{path.name}: {transcript}",
                out_dir / "spectrogram.png",
            )
            for name, w in weights.items():
                draw_heads(w, times, times, name, out_dir / f"{name}.png")

        def page(weights: dict[str, np.ndarray]) -> dict:
            spectrogram = features.T.numpy()[::-1]  # low bins at the bottom
            spectrogram = (spectrogram - spectrogram.min()) / max(float(np.ptp(spectrogram)), 1e-9)
            return {
                "panels": [
                    {"kind": "text", "title": "transcript (greedy)", "lines": [transcript], "place": "above"},
                    {
                        "kind": "image",
                        "title": "log-mel",
                        "pixels": spectrogram,
                        "colormap": "heat",
                        "align": "keys",
                        "span": len(features) * self.config["features"]["hop_ms"] / 1000 / seconds,
                    },  # its frames in encoder frames
                ]
            }

        return AttentionExample(
            run=lambda: model(features[None].to(device), torch.tensor([len(features)], device=device)),
            tokens={"frames": times},
            axes=lambda name: ("frames", "frames"),
            draw=draw,
            page=page,
            meta={"frame_seconds": seconds, "transcript": transcript},
        )

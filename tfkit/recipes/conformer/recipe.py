"""Speech recognition with the Conformer (Gulati et al., 2020) and CTC (Graves et al., 2006).

80-bin log-mel features normalised per utterance; in training, the audio augmented utterance by
utterance (:mod:`.augment`) and SpecAugment (torchaudio's frequency and time masks, the time masks
capped at a fraction of each utterance); convolution subsampling to 40 ms frames, Conformer blocks
with relative-position self-attention, a linear CTC head over characters (:func:`ctc_characters`:
word-initial and doubled letters merged, so fast speech fits its frames) or BPE pieces; greedy and
prefix beam search; CER and WER. The built-in data (:mod:`.speech`) are numbers spoken by eSpeak NG.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import datasets
import numpy as np
import pyarrow as pa
import soundfile
import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from tfkit import config as configs
from tfkit.data import (
    ctc_characters,
    derive_seed,
    encode_once,
    length_buckets,
    list_column,
    load_splits,
    report_unusable,
    require_columns,
    seeded_generator,
    seeded_global_rng,
    train_bpe,
)
from tfkit.decode import ctc_greedy, ctc_prefix_beam_search
from tfkit.errors import UsageError
from tfkit.inspect import draw_heads, draw_spectrogram
from tfkit.nn.blocks import Encoder
from tfkit.nn.conformer import ConvolutionSubsampling, frame_mask
from tfkit.onnx import Graph
from tfkit.recipe import (
    AttentionExample,
    Batch,
    Loss,
    TokenizerRecipe,
    batch_ranges,
    for_each_file,
)
from tfkit.recipes.conformer.augment import COLOURS, augment, warp_spectrum
from tfkit.recipes.conformer.speech import number_text, speech_corpus
from tfkit.registry import register

SPECIALS = ["<blank>", "<unk>"]
BLANK = 0
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}
MAX_SECONDS = 300  # the longest recording read: 7,500 encoder frames, whose attention maps take 900 MB per layer
MAX_INSPECT_SECONDS = 60  # inspect-attention keeps every layer's maps: 1,500 frames, 36 MB a layer of 4 heads


def read_audio(path: Path | str | None, data: bytes | None, sample_rate: int) -> Tensor:
    """Decode a WAV/FLAC/OGG file (or its bytes) to mono float32 at ``sample_rate``; an unreadable,
    empty, silent or too long (MAX_SECONDS, read from the header) file is a UsageError naming it."""
    if data is None and not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    source = io.BytesIO(data) if data is not None else path
    try:
        seconds = soundfile.info(source).duration
        if seconds > MAX_SECONDS:
            raise UsageError(f"{path}: the recording is {seconds:.0f} s long, more than the {MAX_SECONDS} s tfkit "
                             f"transcribes at once (attention grows with its square: cut it into shorter pieces)")
        if data is not None:
            source.seek(0)
        samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise UsageError(f"{path}: not a readable audio file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if samples.shape[0] == 0:
        raise UsageError(f"{path}: the audio is empty")
    mono = torch.from_numpy(samples.mean(axis=1))
    if not torch.isfinite(mono).all():  # a float file can hold them; they would make every feature NaN
        raise UsageError(f"{path}: the audio holds {int((~torch.isfinite(mono)).sum())} non-finite samples (NaN or Inf)")
    if mono.abs().max() < 1e-4:
        raise UsageError(f"{path}: the audio is silent")
    return torchaudio.functional.resample(mono, rate, sample_rate) if rate != sample_rate else mono


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


def spec_augment(features: Tensor, lengths: Tensor, cfg: dict[str, Any]) -> Tensor:
    """SpecAugment (Park et al., 2019) on a padded batch (B, T, F): frequency masks up to
    ``freq_width`` bins, drawn per utterance, and time masks up to ``time_width`` frames but never
    more than ``time_ratio`` of each utterance's own length, so short utterances keep their words.
    Masked cells get 0, the normalised mean; the input is left as it was."""
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


class ConformerCTC(nn.Module):
    def __init__(self, features: int, vocab_size: int, subsampling_channels: int, d_model: int, heads: int, d_ff: int,
                 layers: int, kernel_size: int, dropout: float, drop_path: float, activation: str, attention: str):
        super().__init__()
        self.subsampling = ConvolutionSubsampling(features, d_model, subsampling_channels, dropout)
        self.encoder = Encoder("conformer", layers, d_model, heads, d_ff, dropout, activation, drop_path=drop_path,
                               attention=attention, kernel_size=kernel_size)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, F) features and lengths → CTC log-probabilities (B, T/4, V) and their lengths."""
        x, lengths = self.subsampling(features, lengths)
        x = self.encoder(x, frame_mask(lengths, x.size(1))[:, None, None])
        return self.head(x).float().log_softmax(-1), lengths


def to_int16(samples: Tensor) -> np.ndarray:
    """Samples in [-1, 1] as 16-bit integers, as a WAV file holds them."""
    return (samples * 32768).round().clamp(-32768, 32767).to(torch.int16).numpy()


def pad_features(features: list[Tensor]) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(f) for f in features])
    out = features[0].new_zeros(len(features), int(lengths.max()), features[0].size(1))
    for i, f in enumerate(features):
        out[i, : len(f)] = f
    return out, lengths


def error_rate(hypotheses: list[list[str]], references: list[list[str]]) -> float:
    """Edits (substitutions, insertions, deletions) per reference unit, in percent."""
    edits = sum(torchaudio.functional.edit_distance(r, h) for h, r in zip(hypotheses, references))
    return 100.0 * edits / max(1, sum(map(len, references)))


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
        splits = load_splits(data["name"], lambda: speech_corpus(data, seed), seed, hub_config=data["hub_config"], split_names=data["splits"])
        for split, rows in splits.items():
            require_columns(rows, split, [data["audio_column"], data["text_column"]], "data.audio_column and data.text_column")
        # validation and test features are held in memory; the training split's audio goes into an
        # Arrow table (in datasets' cache when it comes from files), read batch by batch and augmented
        # there, so a corpus of any size costs memory only for its transcripts and lengths
        self.train = self._featurise(splits["train"], "train")
        self.train_table = self.train.with_format("arrow", columns=["samples"])  # once: with_format deep-copies
        # the built-in test set is scored twice: as it is, and through a channel training never drew
        scored = {"validation": [("", "validation")], "test": [("", "test"), ("channel_", "test_channel")]}
        self.texts, self.features, self.parts = {}, {}, {}
        for split, sources in scored.items():
            self.texts[split], self.features[split], self.parts[split] = [], [], []
            for prefix, source in (pair for pair in sources if pair[1] in splits):
                held = self._featurise(splits[source], source)
                self.texts[split] += held["text"][:]
                self.features[split] += self._frames(held.with_format("arrow")[:])
                self.parts[split].append((prefix, len(held)))
        frames, texts = self.train["frames"][:], self.train["text"][:]  # lists: a Column reads Arrow item by item
        self.train_rows = [i for i, n in enumerate(frames) if n > 0]
        texts = [texts[i] for i in self.train_rows]
        if run_dir is not None:
            self.load(run_dir)
        else:
            self.tokenizer = train_bpe(texts, data["vocab_size"], SPECIALS) if data["vocab_size"] else ctc_characters(texts, SPECIALS)
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
            print(f"warning: skipped {len(outputs) - len(keep)} training utterances whose transcript has more "
                  f"tokens than the utterance has 40 ms frames (at speed {fastest:g})", file=sys.stderr)
            if not keep:
                raise UsageError("no training utterance is long enough for its transcript")
        self.train_rows, self.labels = [self.train_rows[i] for i in keep], [self.labels[i] for i in keep]
        self.train_frames = [frames[i] for i in keep]

    def _normalise_text(self, text: str) -> str:
        text = " ".join(text.split())
        return text.lower() if self.config["data"]["lowercase"] else text

    def _featurise(self, rows: datasets.Dataset, split: str) -> datasets.Dataset:
        """Rows of transcript, frame count and log-mel features (flattened), or for training the
        16-bit samples the loader augments; unreadable or too short audio is reported in one
        warning and left with 0 frames."""
        data = self.config["data"]
        if isinstance(rows.features[data["audio_column"]], datasets.Audio):
            rows = rows.cast_column(data["audio_column"], datasets.Audio(decode=False))
        spec = Path(data["name"]).expanduser()
        base = spec if spec.is_dir() else spec.parent  # paths in a manifest are relative to it
        log_mel = self._log_mel()
        kept = "samples" if split == "train" else "features"

        def featurise(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            out: dict[str, list] = {"text": [], kept: [], "frames": [], "problem": []}
            for number, cell, text in zip(indices, batch[data["audio_column"]], batch[data["text_column"]]):
                if not isinstance(text, str) or not text.strip():
                    raise UsageError(f"the {split} data's row {number + 1} has no transcript in column '{data['text_column']}'")
                samples, problem = torch.zeros(0), ""
                try:
                    if isinstance(cell, str):
                        samples = read_audio(base / cell, None, data["sample_rate"])
                    else:
                        samples = read_audio(cell.get("path"), cell.get("bytes"), data["sample_rate"])
                    if ConvolutionSubsampling.output_lengths(torch.tensor(log_mel.frames(len(samples)))) < 1:
                        problem = f"row {number + 1}: too short ({len(samples) / data['sample_rate']:.3f} s)"
                except UsageError as e:
                    problem = str(e)
                if problem:
                    samples = torch.zeros(0)
                out["text"].append(self._normalise_text(text))
                if kept == "samples":
                    out[kept].append(to_int16(samples))
                else:
                    out[kept].append(log_mel(samples).flatten().numpy())
                out["frames"].append(log_mel.frames(len(samples)))
                out["problem"].append(problem)
            return out

        settings = [split, kept, *(data[k] for k in ("name", "audio_column", "text_column", "sample_rate", "lowercase")), self.config["features"]]
        values = datasets.Sequence(datasets.Value("int16" if kept == "samples" else "float32"))
        columns = datasets.Features({"text": datasets.Value("string"), kept: values, "frames": datasets.Value("int64"), "problem": datasets.Value("string")})
        done = encode_once(rows, featurise, settings, columns)
        report_unusable(done, split, "unusable recordings")
        return done if split == "train" else done.filter(lambda frames: frames > 0, input_columns="frames")

    def _frames(self, rows: pa.Table) -> list[Tensor]:
        """The stored (flattened) feature rows of an Arrow table, each as (T, n_mels): views of one
        buffer read at once (numpy formatting converts row by row)."""
        values, bounds = list_column(rows, "features")
        return [values[start:end].view(-1, self.config["features"]["n_mels"]) for start, end in zip(bounds, bounds[1:])]

    def _train_samples(self, rows: list[int]) -> list[Tensor]:
        """Audio of training utterances (positions in ``train_rows``), read from the Arrow table."""
        values, bounds = list_column(self.train_table[[self.train_rows[i] for i in rows]], "samples")
        audio = values.float() / 32768
        return [audio[start:end] for start, end in zip(bounds, bounds[1:])]

    def _log_mel(self) -> LogMel:
        f = self.config["features"]
        return LogMel(self.config["data"]["sample_rate"], f["n_mels"], f["window_ms"], f["hop_ms"])

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        return ConformerCTC(
            self.config["features"]["n_mels"], self.tokenizer.get_vocab_size(), m["subsampling_channels"], m["d_model"],
            m["heads"], m["d_ff"], m["layers"], m["kernel_size"], m["dropout"], m["drop_path"], m["activation"],
            m["attention"],
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
            features = [log_mel(*augment(samples, self.config["augment"], rate, draws, audio[:i] + audio[i + 1 :])) for i, samples in enumerate(audio)]
            with seeded_global_rng(batch_seed):  # torchaudio's masks
                batch, lengths = pad_features(features)
                batch = spec_augment(batch, lengths, self.config["specaugment"])
            labels = [torch.tensor(self.labels[i]) for i in rows]
            targets = pad_sequence(labels, batch_first=True, padding_value=BLANK)  # (B, S): one row per utterance
            yield {"features": batch, "lengths": lengths, "targets": targets, "target_lengths": torch.tensor([len(t) for t in labels])}

    def loss(self, model: nn.Module, batch: Batch) -> Loss:
        """CTC loss per target token (summed over the batch, divided by its tokens); counts frames."""
        log_probs, lengths = model(batch["features"], batch["lengths"])
        total = F.ctc_loss(log_probs.transpose(0, 1), batch["targets"], lengths, batch["target_lengths"],
                           blank=BLANK, reduction="sum", zero_infinity=True)
        return Loss([(total, int(batch["target_lengths"].sum()))], int(batch["lengths"].sum()))

    # -- using the model --------------------------------------------------------------------------
    @torch.no_grad()
    def transcribe(self, model: nn.Module, features: list[Tensor], beam: int | None = None, rank: int = 0, world: int = 1) -> dict[int, str]:
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

    def eval_outputs(self, model: nn.Module, split: str, rank: int = 0, world: int = 1, beam: int | None = None) -> dict[int, str]:
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
        for_each_file(path, AUDIO_SUFFIXES, "audio files", lambda audio: out.write(f"{audio}\t{self._transcribe_file(model, audio, beam)}\n"))

    def _transcribe_file(self, model: nn.Module, path: Path, beam: int | None) -> str:
        features = self._log_mel()(read_audio(path, None, self.config["data"]["sample_rate"]))
        if ConvolutionSubsampling.output_lengths(torch.tensor(len(features))) < 1:
            raise UsageError(f"{path}: the recording is too short to transcribe ({len(features)} frames)")
        return self.transcribe(model, [features], beam)[0]

    def export_hf(self, model: nn.Module, out: Path) -> None:
        raise UsageError("no transformers class matches the Conformer-CTC model (relative-position attention, macaron "
                         "feed-forwards, convolution modules)")

    def onnx_graphs(self, model: nn.Module) -> list[Graph]:
        """Normalised log-mel features (B, T, n_mels), zero after each utterance's length, and the
        lengths → CTC log-probabilities (B, T', vocabulary) and their lengths T'."""
        n_mels = self.config["features"]["n_mels"]

        def example(batch: int, length: int) -> dict[str, Tensor]:
            frames = 16 * length  # the lengths Graph checks at are token counts: 80 to 176 frames here
            lengths = torch.linspace(frames, frames * 0.6, batch).long()  # padded rows, so the masks matter
            features = torch.randn(batch, frames, n_mels, generator=torch.Generator().manual_seed(batch * 1000 + length))
            return {"features": features * frame_mask(lengths, frames)[..., None], "lengths": lengths}

        return [Graph("model", model, example, ["log_probs", "output_lengths"], {"features": {0: "batch", 1: "frames"}, "lengths": {0: "batch"}},
                      limits={"frames": {"min": 16}})]  # the two stride-2 convolutions leave 3 frames

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        data, f = self.config["data"], self.config["features"]
        return {**super().onnx_processing(out), "sample_rate": data["sample_rate"], "n_mels": f["n_mels"],
                "window_ms": f["window_ms"], "hop_ms": f["hop_ms"], "blank_id": BLANK, "lowercase": data["lowercase"],
                "inputs": "features: mono audio at sample_rate, torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=window, "
                          "hop_length=hop, n_mels) with window and hop the milliseconds in samples, log(x + 1e-6), then each "
                          "mel bin less its mean over the utterance, divided by its standard deviation + 1e-5; zero-padded to "
                          "the longest in the batch, with lengths its real frames",
                "outputs": "log_probs (B, T', V): per 40 ms frame; greedy CTC: the best id per frame up to output_lengths, "
                           "repeats merged, blank_id removed, the rest decoded by tokenizer.json"}

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
            raise UsageError(f"{path}: the recording is {frames * seconds:.0f} s long; inspect-attention keeps every frame × frame "
                             f"map of every layer, so it reads at most {MAX_INSPECT_SECONDS} s (cut out the part to look at)")
        times = [f"{t * seconds:.2f}s" for t in range(frames)]
        transcript = self.transcribe(model, [features])[0]

        def draw(weights: dict[str, np.ndarray], out_dir: Path) -> None:
            draw_spectrogram(features.T.numpy(), self.config["features"]["hop_ms"] / 1000, f"{path.name}: {transcript}", out_dir / "spectrogram.png")
            for name, w in weights.items():
                draw_heads(w, times, times, name, out_dir / f"{name}.png")

        def page(weights: dict[str, np.ndarray]) -> dict:
            spectrogram = features.T.numpy()[::-1]  # low bins at the bottom
            spectrogram = (spectrogram - spectrogram.min()) / max(float(np.ptp(spectrogram)), 1e-9)
            return {"panels": [
                {"kind": "text", "title": "transcript (greedy)", "lines": [transcript], "place": "above"},
                {"kind": "image", "title": "log-mel", "pixels": spectrogram, "colormap": "heat", "align": "keys",
                 "span": len(features) * self.config["features"]["hop_ms"] / 1000 / seconds},  # its frames in encoder frames
            ]}

        return AttentionExample(
            run=lambda: model(features[None].to(device), torch.tensor([len(features)], device=device)),
            tokens={"frames": times},
            axes=lambda name: ("frames", "frames"),
            draw=draw,
            page=page,
            meta={"frame_seconds": seconds, "transcript": transcript},
        )

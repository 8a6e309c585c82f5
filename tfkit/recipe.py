"""What every task recipe provides to the trainer, the run directory and the CLI.

A recipe owns its data, tokenizer or label set, model construction, loss, metrics, prediction on user
files, and the example it feeds through the model for ``inspect-attention``. It registers under the
registry kind "recipe" and ships ``<config_file>`` in its package, laid over the trainer's
``tfkit/train.yaml``, as its default config and schema; it declares the ranges and choices of its own
config keys and which of its metrics are better lower, so core names no recipe's keys or metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import numpy as np
import torch
import yaml
from tokenizers import Tokenizer
from torch import Tensor, nn

from tfkit import config as configs
from tfkit import run as runs
from tfkit.errors import UsageError, report_bad_input

Batch = dict[str, Tensor]
PRESET_ORDER = ("tiny", "small", "base", "large")
MIN_STEPS = 500  # train.steps chosen from a small dataset: enough for warmup and a few evaluations


@dataclass
class Loss:
    """A batch's loss as sums over its examples and the count each sum is averaged over:
    value = Σ sum / count.

    The sums and counts stay apart because processes that each hold part of a global batch must
    divide by the counts of the whole batch to take the step that one process would take.
    """

    terms: list[tuple[Tensor, float]]  # (differentiable sum, how many items it covers)
    items: int  # what the progress bar counts (tokens, images, frames)

    def value(self, counts: list[float]) -> Tensor:
        """The mean loss over ``counts`` (one per term): the batch's own, or the global batch's."""
        return sum(total / max(count, 1.0) for (total, _), count in zip(self.terms, counts))


@dataclass
class AttentionExample:
    """One input ready for inspection: ``run`` feeds it through the model.

    ``draw``, when given, replaces the default heatmap grids: it gets the captured weights
    ({module: (heads, query, key)}) and the output folder, and writes its own pictures.
    ``meta`` goes into tokens.json beside the tokens (an image recipe records its patch grid).
    ``head_types``, when given, measures what kind of head each one is on a probe of the recipe's
    own ({module: {kind: a score per head}}, see :func:`tfkit.inspect.head_type_scores`): a table under
    ``head_types_title``, with heads starred past ``head_type_marks``; the scores also become columns
    of report.html's per-head table.

    ``page``, when given, adds the recipe's own views to report.html (:mod:`tfkit.page`) with no
    page code of its own: it gets the captured weights and returns data,
    ``{"panels": [panel, ...], "boundaries": {axis: index}}`` (both keys optional). ``boundaries``
    draws a line before that token wherever the axis is shown (BERT's second segment). Each panel is
    a dict with a ``kind`` and a ``title``; numpy arrays anywhere in it are sent in 8 bits over their
    own range. The kinds the page draws:

    - ``text``: ``lines`` (a list of strings), e.g. a transcript.
    - ``table``: ``columns`` and ``rows`` (lists of str/numbers); sortable by column.
    - ``image``: ``pixels`` (h, w) or (h, w, 3) in [0, 1], ``colormap`` "gray" (default) or "heat".
      Optional ``overlay`` ``{"query": q, "keys": [start, stop], "grid": [rows, cols]}`` lays the
      chosen head's row q, keys start..stop, over the image as a rows × cols map (ViT's [CLS] →
      patches); optional ``maps`` ``{label: 2-D array}`` are laid over it too (rollout).
    - ``plot``: ``lines`` ``{name: [value per x]}``, drawn as lines (a series, per-step importance).
    - ``alignment``: ``modules`` (names) and ``rows`` (a label per query): the chosen one of those
      modules (else the last) with its rows relabelled, each row's largest weight boxed and written
      as Pharaoh ``key-query`` pairs (translation's cross-attention).

    ``"place": "above"`` puts a panel above the heatmap instead of below it; an ``image`` or ``plot``
    with ``"align": "keys"`` is drawn inside the heatmap, right above it on the same key axis,
    stretched over ``span`` keys (default: all of them; a spectrogram's frames past the last
    encoder frame make it a little more), and with ``"axis": name`` only over modules whose keys are
    that axis.
    """

    run: Callable[[], Any]
    tokens: dict[str, list[str]]  # axis name → labels, e.g. {"source": [...], "target": [...]}
    axes: Callable[[str], tuple[str, str]]  # attention module name → (query axis, key axis)
    draw: Callable[[dict[str, np.ndarray], Path], None] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    head_types: Callable[[], dict[str, dict[str, list[float]]]] | None = None
    head_types_title: str = "head types"  # the title of the table inspect-attention prints of them
    head_type_marks: dict[str, float] = field(default_factory=dict)  # kind → a score above which a head is starred
    page: Callable[[dict[str, np.ndarray]], dict[str, Any]] | None = None


class Recipe:
    """Base class of task recipes; subclasses set ``config_file``, and their docstring's first line
    is the description ``tfkit recipes`` shows."""

    config_file: str
    unit = "tok"  # what loss() counts, for the progress bar's throughput
    ranges: dict[str, tuple[str, Callable[[Any], bool]]] = {}  # the recipe's own keys' ranges (configs.ranges)
    choices: dict[str, tuple[str, ...]] = {}  # dotted key → its valid values, checked before any data is read
    minimised: tuple[str, ...] = ()  # metrics that are better lower (a name ending in one counts: test_cer)

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.chosen: dict[str, str] = {}  # config key → why: what settle() chose from the data

    BUILTIN_SIZES: dict[str, Any] = {}  # what the built-in data needs of the keys left at auto

    def builtin_sizes(self) -> dict[str, Any]:
        """The sizes of the built-in data being prepared ({dotted key: value}); none for a user's data."""
        return self.BUILTIN_SIZES if self.config["data"]["name"] == "builtin" else {}

    def settle(self, key: str, infer: Callable[[], tuple[Any, str]] | None = None) -> None:
        """Give the dotted config key ``key``, if it is ``auto``, its value: the built-in data's
        (:meth:`builtin_sizes`), else the (value, why) that ``infer`` finds in the user's data.
        A value the user set is kept as it is."""
        *sections, name = key.split(".")
        node = self.config
        for section in sections:
            node = node[section]
        if node[name] != configs.AUTO:
            return
        builtin = self.builtin_sizes()
        value, why = (builtin[key], "the built-in data's") if key in builtin else infer()
        node[name] = value
        self.chosen[key] = f"{value} ({why})"

    def settle_builtin(self) -> None:
        """Every key the built-in data has a size for, as preparing it settles them."""
        for key in self.builtin_sizes():
            self.settle(key)

    def settle_steps(self, examples: int) -> None:
        """``train.steps`` when auto: the built-in data's, or ``train.epochs`` passes over
        ``examples`` training examples, at least MIN_STEPS."""
        train = self.config["train"]

        def infer() -> tuple[int, str]:
            per_epoch = math.ceil(examples / (train["batch_size"] * train["accumulate"]))
            steps = max(MIN_STEPS, train["epochs"] * per_epoch)
            return steps, f"{train['epochs']} epochs of {examples:,} examples at {per_epoch:,} steps each, at least {MIN_STEPS}"

        self.settle("train.steps", infer)

    @classmethod
    def folder(cls) -> Any:
        """The recipe's package folder, where its YAML files lie."""
        return resources.files(cls.__module__.rpartition(".")[0])

    @classmethod
    def presets(cls) -> list[str]:
        """The recipe's named sizes: tiny, its own YAML (sized for its built-in data), then each
        ``<recipe>.<preset>.yaml`` beside it, small before base."""
        stem = cls.config_file.removesuffix(".yaml")
        found = [
            f.name[len(stem) + 1 : -len(".yaml")]
            for f in cls.folder().iterdir()
            if f.name.startswith(f"{stem}.") and f.name.endswith(".yaml") and f.name != cls.config_file
        ]
        return [
            "tiny",
            *sorted(found, key=lambda name: (PRESET_ORDER.index(name) if name in PRESET_ORDER else len(PRESET_ORDER), name)),
        ]

    @classmethod
    def default_config(cls, preset: str = "tiny") -> dict[str, Any]:
        """The trainer's YAML with the recipe's laid over it, then the preset's file."""

        def read(resource: Any) -> dict[str, Any]:
            return yaml.safe_load(resource.read_text(encoding="utf-8"))

        own = read(cls.folder() / cls.config_file)
        config = configs.layer(read(resources.files("tfkit") / "train.yaml"), own)
        config = {**{section: config[section] for section in own}, **config}  # in the recipe's order
        if preset == "tiny":
            return config
        if preset not in cls.presets():
            raise UsageError(f"unknown preset '{preset}' for {config['recipe']} (valid: {', '.join(cls.presets())})")
        return configs.merge(config, read(cls.folder() / f"{cls.config_file.removesuffix('.yaml')}.{preset}.yaml"))

    @classmethod
    def preset_parameters(cls, preset: str) -> int:
        """The parameter count of the preset's model on the built-in data, built on the meta device
        (no memory, no data read)."""
        recipe = cls(cls.default_config(preset))
        recipe.imitate_builtin_data()
        with torch.device("meta"):
            return sum(p.numel() for p in recipe.build_model().parameters())

    def check(self) -> None:
        """Build the model on the meta device (no memory, no data read) at the built-in data's sizes,
        so that a block that does not fit its stack, a position or attention its model cannot place,
        or sizes that do not divide fail in one line before any data is prepared."""
        builtin = type(self).default_config()["data"]["name"]
        probe = type(self)(configs.layer(self.config, {"data": {"name": builtin}}))
        probe.imitate_builtin_data()
        with torch.device("meta"):
            probe.build_model()

    def imitate_builtin_data(self) -> None:
        """Give :meth:`build_model` what preparing the built-in data would (the vocabulary or the
        label set, the sizes chosen for that data) without reading it, so that ``tfkit recipes`` can
        count each preset's parameters."""
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------------------
    def prepare(self, run_dir: Path | None = None) -> None:
        """Load the data. Fit the tokenizer (or labels), or load them from ``run_dir`` when given."""
        raise NotImplementedError

    def save(self, run_dir: Path) -> None:
        """Write what :meth:`load` needs besides config and weights (tokenizer, labels)."""
        raise NotImplementedError

    def load(self, run_dir: Path) -> None:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """The training batches of one epoch, in an order that depends only on the seed and epoch."""
        raise NotImplementedError

    def shard(self, batch: Batch, rank: int, world: int) -> Batch:
        """Process ``rank``'s part of a global batch when ``world`` processes train together. Every
        tensor is split along its first dimension; a recipe with other layouts overrides this. (The
        first tensor of a batch always has one row per example: the trainer counts examples by it.)"""
        return {k: v.tensor_split(world)[rank] for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: Batch) -> Loss:
        """The batch's loss as sums and the counts they are averaged over (see :class:`Loss`)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, **options: Any) -> dict[str, float]:
        """Metrics on ``split`` computed in this process."""
        outputs = self.eval_outputs(model, split, **options)
        return self.score(split, [outputs[i] for i in sorted(outputs)])

    def eval_outputs(self, model: nn.Module, split: str, rank: int = 0, world: int = 1, **options: Any) -> dict[int, Any]:
        """What :meth:`score` needs of each item of ``split`` (a hypothesis, a correct flag), keyed by
        the item's place in the split. Process ``rank`` of ``world`` evaluates the batches
        :func:`batch_ranges` gives it, the same batches one process makes, so the outputs of all
        processes merged are one process's outputs."""
        raise NotImplementedError

    def score(self, split: str, outputs: list[Any]) -> dict[str, float]:
        """The metrics of ``split`` from the outputs of all its items, in order."""
        raise NotImplementedError

    reference: str | None = None  # the baseline ``evaluate`` measures every row against, in percent

    def baselines(self, split: str) -> dict[str, dict[str, float]]:
        """Peer models fitted on the same training data and scored on ``split`` with the same metrics
        ({name: metrics}), printed by ``evaluate`` beside the model's own row; none by default."""
        return {}

    # -- using a trained run ----------------------------------------------------------------------
    def predict_file(self, model: nn.Module, path: Path, out: TextIO, **options: Any) -> None:
        """Write predictions for one input file; raise :class:`tfkit.errors.UsageError` for a bad file."""
        raise NotImplementedError

    def predict_header(self) -> str | None:
        """The header line of a table that every file's predictions add rows to, written once."""
        return None

    def attention_example(self, model: nn.Module, text: str) -> AttentionExample:
        raise NotImplementedError

    # -- starting from published weights (``tfkit train RECIPE --init DIR``) ------------------------
    @classmethod
    def pretrained_config(cls, path: Path) -> dict[str, Any]:
        """Config overrides that make the model match the pretrained one in ``path``."""
        raise UsageError(f"recipe '{cls.config_file.removesuffix('.yaml')}' cannot start from pretrained weights (--init)")

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        raise UsageError(f"recipe '{self.config['recipe']}' cannot start from pretrained weights (--init)")

    # -- taking a trained model elsewhere (``tfkit export``) ----------------------------------------
    def export_hf(self, model: nn.Module, out: Path) -> None:
        """Write ``model`` into the folder ``out`` as ``transformers`` saves its counterpart: config.json,
        model.safetensors, and the tokenizer or preprocessor_config.json; raise a UsageError that names
        the config key where the model has no counterpart."""
        onnx = type(self).onnx_graphs is not Recipe.onnx_graphs
        raise UsageError(
            f"recipe '{self.config['recipe']}' has no transformers equivalent" + (" (export it with --to onnx)" if onnx else "")
        )

    def onnx_graphs(self, model: nn.Module) -> list[Any]:
        """The inference graphs of ``model`` as :class:`tfkit.onnx.Graph` objects."""
        raise UsageError(f"recipe '{self.config['recipe']}' cannot be exported to ONNX")

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        """What a user of the graphs must do before and after them, for onnx.json; files it names
        (a tokenizer) are written into ``out``."""
        return {}


@dataclass
class Vocabulary:
    """What :meth:`Recipe.build_model` reads of a tokenizer, for :meth:`Recipe.imitate_builtin_data`."""

    size: int

    def get_vocab_size(self) -> int:
        return self.size


class TokenizerRecipe(Recipe):
    """A recipe whose run directory carries its ``tokenizers`` tokenizer (tokenizer.json)."""

    tokenizer: Tokenizer

    def save(self, run_dir: Path) -> None:
        runs.write_tokenizer(run_dir, self.tokenizer)

    def load(self, run_dir: Path) -> None:
        self.tokenizer = runs.read_tokenizer(run_dir)

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        self.tokenizer.save(str(out / "tokenizer.json"))
        return {"tokenizer": "tokenizer.json"}


def batch_ranges(count: int, size: int, rank: int = 0, world: int = 1) -> Iterator[range]:
    """The places of the batches of ``size`` over ``count`` items that process ``rank`` of ``world``
    evaluates: every ``world``-th batch, starting at its own rank."""
    for start in range(rank * size, count, world * size):
        yield range(start, min(start + size, count))


def for_each_file(path: Path, suffixes: set[str], kind: str, handle: Callable[[Path], None]) -> None:
    """``handle`` one input file, or every file with one of ``suffixes`` under a folder. In a folder a
    bad file is reported on stderr and the rest still go through; then the count of bad ones is raised."""
    if not path.is_dir():
        handle(path)
        return
    paths = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes)
    if not paths:
        raise UsageError(f"{path}: the folder holds no {kind} ({', '.join(sorted(suffixes))})")
    bad = 0
    for file in paths:
        try:
            handle(file)
        except Exception as e:  # one bad file must not cost the others
            bad += 1
            report_bad_input(file, e)
    if bad:
        raise UsageError(f"{path}: {bad} of {len(paths)} {kind} could not be read")

"""Taking a trained run elsewhere: `tfkit export --to hf` (transformers' Auto classes load the folder and
give tfkit's logits; `tfkit train --init` of it gives the same model back), `--to onnx` (onnxruntime
gives tfkit's outputs), and `tfkit evaluate --data` (a file made from the built-in test split scores
the built-in figures)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import one_error_line, quiet, tfkit
from tfkit import config as configs
from tfkit import registry
from tfkit import run as runs
from tfkit.errors import UsageError
from tfkit.train import start_training

transformers = pytest.importorskip("transformers")

BERT = [
    "data.vocab_size=600",
    "model.d_model=32",
    "model.heads=4",
    "model.d_ff=64",
    "model.layers=2",
    "model.dropout=0.0",
    "train.steps=20",
    "train.lr=0.003",
    "train.warmup=2",
    "train.eval_every=0",
    "train.log_every=10",
    "train.save_every=20",
]
LM = [
    "data.vocab_size=300",
    "data.block_size=32",
    "model.d_model=32",
    "model.heads=4",
    "model.d_ff=64",
    "model.layers=2",
    "model.max_positions=64",
    "train.steps=20",
    "train.batch_size=8",
    "train.lr=0.01",
    "train.warmup=2",
    "train.log_every=10",
    "train.eval_every=0",
    "train.save_every=20",
]
RUNS = {  # a name → the recipe and the settings of a tiny run, trained a few steps (so no logit is near zero)
    "bert-pretrain": ("bert-pretrain", [*BERT, "data.max_length=32", "data.name={prose}"]),
    "classify": ("bert-finetune", [*BERT, "data.max_length=48", "task=classify"]),
    "classify-pair": ("bert-finetune", [*BERT, "data.max_length=48", "task=classify-pair"]),
    "tag": ("bert-finetune", [*BERT, "data.max_length=48", "task=tag"]),
    "qa": ("bert-finetune", [*BERT, "data.max_length=64", "data.doc_stride=16", "task=qa"]),
    "vit": (
        "vit",
        [
            "model.patch=4",
            "model.d_model=32",
            "model.depth=2",
            "model.d_ff=64",
            "model.drop_path=0.0",
            "train.steps=20",
            "train.warmup=2",
            "train.eval_every=0",
            "train.save_every=20",
        ],
    ),
    "gpt": ("causal-lm", [*LM, "data.name={source}"]),
    "llama": ("causal-lm", [*LM, "data.name={source}", "model.block=llama", "model.position=rotary", "model.activation=swish"]),
}


def small_corpora(root: Path) -> dict[str, str]:
    """Folders of train/validation/test files, small beside the built-in corpora (which the causal-lm
    and bert-pretrain recipes would tokenize whole for every run and evaluation): some standard
    library source files as .jsonl documents, and language-reference topics as .txt prose."""
    from pydoc_data.topics import topics

    from tfkit.recipes.bert.data import sentences

    source, prose = root / "source", root / "prose"
    source.mkdir()
    prose.mkdir()
    files = sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")) + sorted(
        (Path(sysconfig.get_paths()["stdlib"]) / "http").glob("*.py")
    )
    documents = [found for name in sorted(topics) if len(found := sentences(topics[name])) >= 2][:90]
    for split, part in (("train", slice(4, None)), ("validation", slice(0, 2)), ("test", slice(2, 4))):
        (source / f"{split}.jsonl").write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in files[part]))
    for split, part in (("train", slice(20, None)), ("validation", slice(0, 10)), ("test", slice(10, 20))):
        (prose / f"{split}.txt").write_text("\n\n".join("\n".join(doc) for doc in documents[part]) + "\n")
    return {"source": str(source), "prose": str(prose)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """name → its run directory, trained the first time a test asks for it."""
    root, made = tmp_path_factory.mktemp("export-runs"), {}
    corpora = small_corpora(root)

    def get(name: str) -> Path:
        if name not in made:
            recipe, sets = RUNS[name]
            sets = [s.format(**corpora) for s in sets]
            config = configs.resolve(registry.get("recipe", recipe).default_config(), None, sets)
            trainer = start_training(config, root / name, torch.device("cpu"), console=quiet())
            trainer.fit(progress=False)
            made[name] = trainer.run_dir
        return made[name]

    return get


# -- tfkit export --to hf ---------------------------------------------------------------------------
AUTO = {
    "bert-pretrain": ("AutoModelForPreTraining", "BertForPreTraining"),
    "classify": ("AutoModelForSequenceClassification", "BertForSequenceClassification"),
    "classify-pair": ("AutoModelForSequenceClassification", "BertForSequenceClassification"),
    "tag": ("AutoModelForTokenClassification", "BertForTokenClassification"),
    "qa": ("AutoModelForQuestionAnswering", "BertForQuestionAnswering"),
    "vit": ("AutoModelForImageClassification", "ViTForImageClassification"),
    "gpt": ("AutoModelForCausalLM", "GPT2LMHeadModel"),
    "llama": ("AutoModelForCausalLM", "LlamaForCausalLM"),
}
SENTENCES = [
    ("Return the value of the key.", "Raise ValueError if the stream is closed."),
    ("The first line of a docstring says what a function does.", "It is short."),
]


def ours_and_theirs(name: str, recipe, model, hf, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The same inputs through tfkit's model and the transformers one: their logits, flattened."""
    if name == "vit":
        images = torch.randn(3, recipe.config["data"]["channels"], 8, 8)
        return model(images), hf(pixel_values=images).logits
    if name in ("gpt", "llama"):
        ids = torch.randint(1, recipe.tokenizer.get_vocab_size(), (2, 40), generator=torch.Generator().manual_seed(0))
        return model.logits(model(ids)), hf(ids).logits
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    pair = name in ("classify-pair", "bert-pretrain", "qa")
    for a, b in SENTENCES:  # the exported tokenizer gives tfkit's ids and segments
        ids, segments = recipe.encode(a, b if pair else None)
        theirs = tokenizer(a, b if pair else None)
        assert (theirs["input_ids"], theirs["token_type_ids"]) == (ids, segments)
    batch = tokenizer([a for a, _ in SENTENCES], [b for _, b in SENTENCES] if pair else None, padding=True, return_tensors="pt")
    ids, segments, real = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"].bool()
    out = hf(**batch)
    if name == "bert-pretrain":  # MLM logits at every position (tfkit computes them where asked), NSP
        mlm, nsp = model(ids, segments, torch.arange(ids.numel()))
        return torch.cat([mlm.view(*ids.shape, -1)[real].flatten(), nsp.flatten()]), torch.cat(
            [out.prediction_logits[real].flatten(), out.seq_relationship_logits.flatten()]
        )
    ours = model(ids, segments)
    if name == "qa":
        return ours[real], torch.stack([out.start_logits, out.end_logits], -1)[real]
    return (ours[real], out.logits[real]) if name == "tag" else (ours, out.logits)


@pytest.mark.parametrize("name", list(AUTO))
def test_transformers_loads_the_export_with_the_same_logits_and_init_gives_the_run_back(capsys, tiny_run, tmp_path, name):
    run = tiny_run(name)
    folder = tmp_path / "hf"
    code, _, err = tfkit(capsys, "export", str(run), str(folder), "--to", "hf")
    assert code == 0, err
    auto, expected_class = AUTO[name]
    hf, info = getattr(transformers, auto).from_pretrained(folder, output_loading_info=True)
    assert type(hf).__name__ == expected_class
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    recipe, model = runs.open_run(run)
    labels = getattr(recipe, "labels", None)
    if name in ("classify", "classify-pair", "tag", "vit"):
        assert [hf.config.id2label[i] for i in range(len(labels))] == labels
    with torch.no_grad():
        ours, theirs = ours_and_theirs(name, recipe, model, hf.eval(), folder)
    assert ours.std() > 0.02  # logits that differ from input to input, or the comparison proves little
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    recipe_name, sets = RUNS[name]
    data = [
        f"{s.split('=')[0]}={runs.read_config(run)['data'][s.split('=')[0].removeprefix('data.')]}"
        if s.startswith("data.")
        else s
        for s in sets
        if s.startswith(("data.", "task="))
    ]
    code, _, err = tfkit(
        capsys,
        "train",
        recipe_name,
        "--init",
        str(folder),
        "--max-steps",
        "0",
        "--out",
        str(tmp_path / "again"),
        *sum((["--set", s] for s in data), []),
    )
    assert code == 0, err
    _, again = runs.open_run(tmp_path / "again")
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for key in first:  # every tensor, the task head's too
        torch.testing.assert_close(second[key], first[key], atol=0, rtol=0, msg=key)


def test_the_vit_preprocessor_normalises_as_tfkit_does(tiny_run, tmp_path):
    from PIL import Image

    from tfkit.export import export

    run = tiny_run("vit")
    export(run, tmp_path / "hf", "hf")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    recipe, _ = runs.open_run(run)
    pixels = torch.randint(0, 256, (8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    theirs = processor(Image.fromarray(pixels.numpy(), mode="L"), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(theirs, recipe._normalise(pixels[None, None]), atol=1e-5, rtol=1e-5)


def test_what_has_no_transformers_counterpart_is_named_in_one_line(capsys, tiny_run, tmp_path):
    recipe, model = runs.open_run(tiny_run("gpt"))
    recipe.config["model"]["position"] = "sinusoidal"
    with pytest.raises(UsageError, match="model.position 'sinusoidal' with model.block gpt has no transformers equivalent"):
        recipe.export_hf(model, tmp_path)
    recipe, model = runs.open_run(tiny_run("classify"))
    recipe.config["model"]["block"] = "pre_ln"
    with pytest.raises(UsageError, match="model.block 'pre_ln' has no transformers BERT equivalent"):
        recipe.export_hf(model, tmp_path)

    run = tiny_run("classify")
    code, _, err = tfkit(capsys, "export", str(run), str(tmp_path / "x"), "--to", "keras")
    assert code == 2
    one_error_line(err, "unknown --to 'keras' (valid: hf, onnx)")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    code, _, err = tfkit(capsys, "export", str(run), str(tmp_path / "full"), "--to", "hf")
    assert code == 2
    one_error_line(err, "already exists and is not an empty folder")
    code, _, err = tfkit(capsys, "export", str(run), str(tmp_path / "y"), "--to", "hf", "--checkpoint", "best")
    assert code == 2
    one_error_line(err, "has no best checkpoint")


# -- tfkit evaluate --data --------------------------------------------------------------------------
def write_test_split(name: str, run: Path, folder: Path) -> Path:
    """The built-in test split of ``run`` written in one of the recipe's input formats."""
    recipe, _ = runs.open_run(run)
    recipe.prepare(run)
    if name in ("bert-pretrain", "gpt"):  # trained on a folder of split files: its test file, moved elsewhere
        source = next(Path(recipe.config["data"]["name"]).glob("test.*"))
        path = folder / source.name
        path.write_text(source.read_text())
    elif name in ("classify", "classify-pair"):
        path = folder / "test.jsonl"
        rows = [
            {"text": fields[0], **({"text_pair": fields[1]} if len(fields) > 1 else {}), "label": label}
            for fields, label in recipe.rows["test"]
        ]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif name == "tag":  # CoNLL: a word and its tag per line
        path = folder / "test.conll"
        path.write_text("\n".join("".join(f"{w} {t}\n" for w, t in zip(words, tags)) for words, tags in recipe.rows["test"]))
    elif name == "qa":  # SQuAD v1.1 JSON, a paragraph per question
        path = folder / "test.json"
        paragraphs = [
            {
                "context": q.context,
                "qas": [{"id": q.id, "question": q.question, "answers": [{"text": t, "answer_start": s} for t, s in q.answers]}],
            }
            for q in recipe.rows["test"]
        ]
        path.write_text(json.dumps({"data": [{"title": "test", "paragraphs": paragraphs}]}))
    elif name == "vit":  # a folder of images, one subfolder per class
        from PIL import Image

        path = folder / "images"
        for i, (image, target) in enumerate(zip(recipe.images["test"], recipe.targets["test"].tolist())):
            (path / recipe.labels[target]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(path / recipe.labels[target] / f"{i}.png")
    elif name == "translation":
        path = folder / "test.tsv"
        path.write_text("source\ttarget\n" + "".join(f"{source}\t{target}\n" for source, target in recipe.pairs["test"]))
    return path


@pytest.mark.parametrize("name", ["bert-pretrain", "classify", "tag", "qa", "vit", "gpt", "translation"])
def test_evaluate_on_a_file_of_the_test_split_gives_the_built_in_figures(capsys, tiny_run, trained_run, tmp_path, name):
    run = trained_run if name == "translation" else tiny_run(name)
    path = write_test_split(name, run, tmp_path)
    code, out, err = tfkit(capsys, "evaluate", str(run), "--json")
    assert code == 0, err
    built_in = json.loads(out)
    code, out, err = tfkit(capsys, "evaluate", str(run), "--data", str(path), "--json")
    assert code == 0, err
    assert json.loads(out) == pytest.approx(built_in, rel=1e-5, abs=1e-5)


def test_evaluate_data_that_does_not_fit_gets_one_line(capsys, tiny_run, tmp_path):
    run = tiny_run("classify")
    rows = [{"text": "Return the value.", "label": label} for label in ["email", "json", "json", "tkinter", "yaml"]]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "nolabel.jsonl").write_text(json.dumps({"text": "Return the value.", "kind": "email"}) + "\n")
    (tmp_path / "data.xml").write_text("<rows/>")
    (tmp_path / "splits").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "splits" / f"{split}.jsonl").write_text(json.dumps(rows[0]) + "\n")
    for path, fragment in [
        ("new.jsonl", "the data has 3 labels that the run was never trained on: 'json' (2), 'yaml' (1)"),
        ("nolabel.jsonl", "has no column 'label' (it has: text, kind"),
        ("data.xml", "has an unknown format"),
        ("splits", "the data has no test split (it has: train, validation; pick one with --split)"),
    ]:
        code, _, err = tfkit(capsys, "evaluate", str(run), "--data", str(tmp_path / path))
        assert code == 2, err
        one_error_line(err, fragment)
    code, out, err = tfkit(capsys, "evaluate", str(run), "--data", str(tmp_path / "splits"), "--split", "validation", "--json")
    assert code == 0 and json.loads(out)["accuracy"] in (0.0, 100.0), err


# -- tfkit export --to onnx -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["classify", "qa", "bert-pretrain", "vit", "llama"])
def test_onnxruntime_gives_tfkits_outputs_at_other_batch_sizes_and_lengths(capsys, tiny_run, tmp_path, name):
    onnxruntime = pytest.importorskip("onnxruntime")
    run = tiny_run(name)
    code, _, err = tfkit(capsys, "export", str(run), str(tmp_path / "onnx"), "--to", "onnx")
    assert code == 0 and "onnxruntime gives PyTorch's outputs to" in err, err
    meta = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert meta["recipe"] == RUNS[name][0] and meta["graphs"]["model"]["max_abs_diff_onnxruntime"] < 1e-4
    if "tokenizer" in meta:
        assert (tmp_path / "onnx" / meta["tokenizer"]).is_file()
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    recipe, model = runs.open_run(run)
    (graph,) = recipe.onnx_graphs(model)
    for batch, length in ((2, 9), (4, 17)):
        feed = graph.example(batch, length)
        with torch.no_grad():
            ours = graph.module(*feed.values())
        theirs = session.run(None, {key: value.numpy() for key, value in feed.items()})
        for expected, got in zip(ours if isinstance(ours, tuple) else (ours,), theirs):
            torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)


def onnx_greedy(folder: Path, sources: list[list[int]]) -> list[list[int]]:
    """Greedy translation as a user of the exported graphs runs it, from onnx.json alone."""
    import numpy as np
    import onnxruntime

    meta = json.loads((folder / "onnx.json").read_text())
    encoder, step = (
        onnxruntime.InferenceSession(str(folder / meta["graphs"][g]["file"]), providers=["CPUExecutionProvider"])
        for g in ("encoder", "decoder_step")
    )
    width = max(map(len, sources))
    source_ids = np.array([ids + [meta["pad_id"]] * (width - len(ids)) for ids in sources], dtype=np.int64)
    (memory,) = encoder.run(None, {"source_ids": source_ids})
    layers, _, heads, _, d_k = meta["graphs"]["decoder_step"]["inputs"]["past_keys"]["shape"]
    keys = values = np.zeros((layers, len(sources), heads, 0, d_k), dtype=np.float32)
    token = np.full((len(sources), 1), meta["bos_id"], dtype=np.int64)
    out, done = [[] for _ in sources], np.zeros(len(sources), dtype=bool)
    for _ in range(int(meta["max_len_a"] * width + meta["max_len_b"])):
        logits, keys, values = step.run(
            None, {"token_ids": token, "memory": memory, "source_ids": source_ids, "past_keys": keys, "past_values": values}
        )
        token = logits.argmax(-1)[:, None]
        for row, t in enumerate(token[:, 0].tolist()):
            if not done[row]:
                done[row] = t == meta["eos_id"]
                out[row] += [] if done[row] else [t]
        if done.all():
            break
    return out


def test_the_translation_graphs_translate_the_test_split_as_tfkit_does(capsys, trained_run, tmp_path):
    pytest.importorskip("onnxruntime")
    code, _, err = tfkit(capsys, "export", str(trained_run), str(tmp_path / "onnx"), "--to", "onnx")
    assert code == 0, err
    recipe, model = runs.open_run(trained_run)
    recipe.prepare(trained_run)
    sources = recipe.sources["test"][:50]
    ours = recipe.translate(model, sources, beam=1)
    theirs = recipe.tokenizer.decode_batch(onnx_greedy(tmp_path / "onnx", sources))
    assert theirs == [ours[i] for i in range(len(sources))]
    assert sum(t == ref for t, (_, ref) in zip(theirs, recipe.pairs["test"])) >= 10  # a model that translates, not noise


def test_the_marian_export_translates_the_test_split_as_tfkit_does(capsys, trained_run, tmp_path):
    code, _, err = tfkit(capsys, "export", str(trained_run), str(tmp_path / "hf"), "--to", "hf")
    assert code == 0, err
    recipe, model = runs.open_run(trained_run)
    recipe.prepare(trained_run)
    texts, sources = [src for src, _ in recipe.pairs["test"][:50]], recipe.sources["test"][:50]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    marian = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    assert type(marian).__name__ == "MarianMTModel"
    assert tokenizer(texts).input_ids == sources  # the same ids, </s> at the end
    ours = recipe.translate(model, sources, beam=1)
    width, decode = max(map(len, sources)), recipe.config["decode"]
    with torch.no_grad():
        out = marian.generate(
            **tokenizer(texts, return_tensors="pt", padding=True),
            num_beams=1,
            do_sample=False,
            max_new_tokens=int(decode["max_len_a"] * width + decode["max_len_b"]),
        )
    assert tokenizer.batch_decode(out, skip_special_tokens=True) == [ours[i] for i in range(len(sources))]
    # and back: --init of the export is the run again, its tokenizer giving the same ids
    code, _, err = tfkit(
        capsys, "train", "translation", "--init", str(tmp_path / "hf"), "--max-steps", "0", "--out", str(tmp_path / "back")
    )
    assert code == 0, err
    back, again = runs.open_run(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=1e-6)
    back.prepare(tmp_path / "back")
    assert back._source_ids(texts) == sources


def test_a_translation_model_marian_cannot_hold_is_named(trained_run, tmp_path):
    recipe, model = runs.open_run(trained_run)
    recipe.config["model"]["encoder"]["block"] = "pre_ln"
    with pytest.raises(UsageError, match="model.encoder.block 'pre_ln' has no transformers Marian equivalent"):
        recipe.export_hf(model, tmp_path)

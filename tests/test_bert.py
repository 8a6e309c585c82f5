"""BERT: masking, sentence pairs, tied weights, pretraining learns, predict and inspection, HF import."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import quiet

from tfkit import config as configs
from tfkit import registry
from tfkit import run as runs
from tfkit.recipes.bert import (
    CLS, IS_NEXT, MASK, NOT_NEXT, PAD, SEP, SPECIALS, Bert, BertForPretraining, bert_weights_from_hf,
    mask_tokens, nsp_pairs, pair_ids,
)
from tfkit.train import start_training
from test_cli import one_error_line, tfkit

TINY_PRETRAIN = [
    "data.vocab_size=600", "model.d_model=64", "model.heads=4", "model.d_ff=128", "model.layers=2", "model.dropout=0.0",
    "train.steps=700", "train.batch_size=64", "train.lr=0.002", "train.warmup=50", "train.eval_every=0",
    "train.log_every=10", "train.save_every=700", "data.max_length=32",
]


def pretrain_config(*sets: str) -> dict:
    return configs.resolve(registry.get("recipe", "bert-pretrain").default_config(), None, [*TINY_PRETRAIN, *sets])


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    trainer = start_training(pretrain_config(), tmp_path_factory.mktemp("bert") / "run", torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    return trainer.run_dir


def test_masking_statistics():
    generator = torch.Generator().manual_seed(0)
    vocab, rows, length = 1000, 400, 60
    ids = torch.randint(len(SPECIALS), vocab, (rows, length), generator=generator)
    lengths = torch.randint(10, length + 1, (rows,), generator=generator)
    ids[:, 0] = CLS
    for i, n in enumerate(lengths.tolist()):
        ids[i, n // 2] = SEP
        ids[i, n - 1] = SEP
        ids[i, n:] = PAD
    masked, positions, labels = mask_tokens(ids, vocab, generator)
    flat, flat_masked = ids.flatten(), masked.flatten()
    assert torch.equal(labels, flat[positions])
    assert bool((flat[positions] >= len(SPECIALS)).all())  # specials and padding are never chosen
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[positions] = True
    assert torch.equal(flat_masked[~chosen], flat[~chosen])  # nothing else changes
    ordinary = (ids >= len(SPECIALS)).sum(1)
    per_row = chosen.view(rows, length).sum(1)
    assert torch.equal(per_row, (ordinary.float() * 0.15).round().clamp(min=1).long())
    became = flat_masked[positions]
    share_mask = (became == MASK).float().mean().item()
    share_same = (became == labels).float().mean().item()
    share_random = ((became != MASK) & (became != labels)).float().mean().item()
    assert abs(share_mask - 0.8) < 0.03 and abs(share_same - 0.1) < 0.02 and abs(share_random - 0.1) < 0.02
    assert bool((became[(became != MASK)] >= len(SPECIALS)).all())  # random tokens are ordinary ones


def test_nsp_pairs_are_half_true_successors_and_half_from_other_documents():
    documents = [[[d * 100 + s] for s in range(6)] for d in range(40)]
    pairs = nsp_pairs(documents, random.Random(0))
    assert len(pairs) == 40 * 5
    for a, b, label in pairs:
        doc, sentence = divmod(a[0], 100)
        if label == IS_NEXT:
            assert b == [doc * 100 + sentence + 1]
        else:
            assert label == NOT_NEXT and b[0] // 100 != doc
    share = sum(label == IS_NEXT for _, _, label in pairs) / len(pairs)
    assert 0.4 < share < 0.6


def test_pair_layout_and_truncation():
    ids, segments = pair_ids([10, 11, 12], [20, 21], 64)
    assert ids == [CLS, 10, 11, 12, SEP, 20, 21, SEP] and segments == [0, 0, 0, 0, 0, 1, 1, 1]
    ids, segments = pair_ids(list(range(100, 120)), [7, 8, 9], 12)  # the longer side loses tokens
    assert ids == [CLS, *range(100, 106), SEP, 7, 8, 9, SEP]  # 12 tokens: A cut from 20 to 6, B kept
    assert segments.count(1) == 4


def test_mlm_output_is_tied_to_the_token_embeddings():
    torch.manual_seed(0)
    model = BertForPretraining(Bert(50, 16, 2, 32, 1, 0.0, "gelu", "post_ln", 32, 1e-12), 1e-12).eval()
    ids = torch.tensor([[CLS, 10, MASK, 12, SEP]])
    positions = torch.tensor([2])
    mlm, nsp = model(ids, torch.zeros_like(ids), positions)
    assert mlm.shape == (1, 50) and nsp.shape == (1, 2)
    matrices = [p for n, p in model.named_parameters() if p.shape == (50, 16)]
    assert len(matrices) == 1  # one vocabulary matrix: input embedding and output layer
    hidden = model.mlm_transform(model.bert(ids, torch.zeros_like(ids))[0][0, 2])
    torch.testing.assert_close(mlm[0], hidden @ model.bert.embed.tokens.weight.T + model.mlm_bias)


def test_tiny_pretraining_learns(pretrained_run):
    records = [r for r in runs.read_metrics(pretrained_run) if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    recipe, model = runs.open_run(pretrained_run)
    recipe.prepare(pretrained_run)
    metrics = recipe.evaluate(model, "test")
    assert set(metrics) == {"mlm_accuracy", "mlm_loss", "nsp_accuracy"}
    # beyond word frequencies: at least twice the accuracy of always answering the commonest token
    labels = torch.cat([batch["mlm_labels"] for batch in recipe.held_out["test"]])
    unigram = 100.0 * labels.bincount().max().item() / len(labels)
    assert metrics["mlm_accuracy"] > 2 * unigram, (metrics, unigram)


def test_predict_fills_masks(capsys, pretrained_run, tmp_path):
    lines = tmp_path / "masked.txt"
    lines.write_text("Return the [MASK] of the list.\nno mask here\nThe [MASK] is closed.\tCall [MASK] again.\n")
    code, out, err = tfkit(capsys, "predict", str(pretrained_run), str(lines), "--top-k", "3")
    assert code == 0, err
    rows = out.split("\n")
    assert len(rows[0].split("\t")) == 3 and rows[1] == "" and len(rows[2].split("\t|\t")) == 2
    assert all(0 <= float(item.split()[-1]) <= 1 for item in rows[0].split("\t"))
    assert "masked.txt:2: no [MASK]" in err


def test_inspect_attention_marks_both_segments(capsys, pretrained_run, tmp_path):
    code, _, err = tfkit(capsys, "inspect-attention", str(pretrained_run), "Open the file.\tRead a line.", "--out", str(tmp_path))
    assert code == 0, err
    described = json.loads((tmp_path / "tokens.json").read_text())
    tokens = described["axes"]["tokens"]
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2
    assert described["segments"] == [0] * (tokens.index("[SEP]") + 1) + [1] * (len(tokens) - tokens.index("[SEP]") - 1)
    weights = np.load(tmp_path / "attention.npz")
    assert set(weights.files) == {"bert.encoder.layers.0.self_attn", "bert.encoder.layers.1.self_attn"}
    assert weights["bert.encoder.layers.1.self_attn"].shape == (4, len(tokens), len(tokens))
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_pretraining_on_a_user_text_file(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    documents = [[f"Sentence {s} of story {d} talks about item {d * s}." for s in range(5)] for d in range(30)]
    corpus.write_text("\n\n".join("\n".join(doc) for doc in documents) + "\n")
    args = ["--data", str(corpus), "--max-steps", "2", "--set", "data.vocab_size=200", "--set", "model.d_model=32",
            "--set", "model.d_ff=64", "--set", "model.layers=1", "--set", "train.batch_size=8"]
    code, out, err = tfkit(capsys, "train", "bert-pretrain", "--out", str(tmp_path / "run"), *args)
    assert code == 0, err
    one_line = tmp_path / "flat.txt"
    one_line.write_text("just one line\n")
    code, _, err = tfkit(capsys, "train", "bert-pretrain", "--data", str(one_line), "--max-steps", "1")
    assert code == 2
    one_error_line(err, "needs documents of two or more sentences")


def test_hugging_face_bert_imports_with_the_same_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    hf_model = transformers.BertModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    ours = Bert(99, 32, 4, 64, 2, 0.0, "gelu", "post_ln", 40, 1e-12).eval()
    ours.load_state_dict(bert_weights_from_hf(tmp_path, 2))
    ids = torch.tensor([[CLS, 20, 21, 22, SEP, 30, 31, SEP], [CLS, 40, 41, SEP, 50, SEP, PAD, PAD]])
    segments = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0]])
    with torch.no_grad():
        hidden, pooled = ours(ids, segments)
        theirs = hf_model(input_ids=ids, token_type_ids=segments, attention_mask=(ids != PAD).long())
    real = ids != PAD
    torch.testing.assert_close(hidden[real], theirs.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, theirs.pooler_output, atol=1e-5, rtol=1e-5)


# -- fine-tuning ------------------------------------------------------------------------------------
TINY_FINETUNE = [
    "data.vocab_size=600", "model.d_model=64", "model.heads=4", "model.d_ff=128", "model.layers=2",
    "train.steps=150", "train.lr=0.001", "train.warmup=15", "train.eval_every=0", "train.log_every=10",
    "train.save_every=150", "data.max_length=48",
]


def finetune(tmp_path, name: str, *sets: str, init=None):
    recipe_cls = registry.get("recipe", "bert-finetune")
    defaults = recipe_cls.default_config()
    if init is not None:
        defaults = configs.merge(defaults, {**recipe_cls.pretrained_config(init), "init": str(init)})
    tiny = [s for s in TINY_FINETUNE if init is None or not s.startswith("model.")]  # init fixes the sizes
    config = configs.resolve(defaults, None, [*tiny, *sets])
    trainer = start_training(config, tmp_path / name, torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    return trainer


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    return finetune(tmp_path_factory.mktemp("classify"), "run", "data.vocab_size=1500", "train.steps=200").run_dir


def test_classify_learns_from_scratch(classify_run):
    recipe, model = runs.open_run(classify_run)
    recipe.prepare(classify_run)
    metrics = recipe.evaluate(model, "test")
    assert metrics["accuracy"] > 50, metrics  # five balanced classes: chance is 20%
    assert 0 < metrics["macro_f1"] <= 100


def test_classify_pair_learns(tmp_path):
    trainer = finetune(tmp_path, "pair", "task=classify-pair", "train.steps=300", "data.vocab_size=1500")
    records = [r for r in runs.read_metrics(trainer.run_dir) if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"]
    assert trainer.recipe.evaluate(trainer.model, "test")["accuracy"] > 65  # two balanced classes


def test_init_from_a_pretrain_run_copies_the_encoder_and_helps(pretrained_run, tmp_path):
    warm = finetune(tmp_path, "warm", init=pretrained_run)
    cold = finetune(tmp_path, "cold")  # the same sizes, vocabulary size and budget, from random weights
    assert (warm.run_dir / "tokenizer.json").read_text() == (pretrained_run / "tokenizer.json").read_text()
    warm_accuracy = warm.recipe.evaluate(warm.model, "test")["accuracy"]
    cold_accuracy = cold.recipe.evaluate(cold.model, "test")["accuracy"]
    assert warm_accuracy > cold_accuracy, (warm_accuracy, cold_accuracy)


def test_init_before_training_equals_the_pretrained_encoder(pretrained_run, tmp_path):
    recipe_cls = registry.get("recipe", "bert-finetune")
    config = configs.merge(recipe_cls.default_config(), {**recipe_cls.pretrained_config(pretrained_run), "init": str(pretrained_run)})
    trainer = start_training(configs.resolve(config, None, ["train.steps=0"]), tmp_path / "run", torch.device("cpu"), console=quiet())
    _, pretrained = runs.open_run(pretrained_run)
    for name, value in pretrained.bert.state_dict().items():
        torch.testing.assert_close(trainer.model.bert.state_dict()[name], value, rtol=0, atol=0)


def test_finetune_predict_and_inspect(capsys, classify_run, tmp_path):
    lines = tmp_path / "sentences.txt"
    lines.write_text("Return the widget configuration.\n\nRun the event loop until the future is done.\n")
    code, out, err = tfkit(capsys, "predict", str(classify_run), str(lines), "--top-k", "2")
    assert code == 0, err
    rows = out.split("\n")[:3]
    assert len(rows[0].split("\t")) == 2 and rows[1] == "" and "sentences.txt:2" in err
    labels = json.loads((classify_run / "labels.json").read_text())
    assert rows[0].split("\t")[0].split()[0] in labels
    code, _, err = tfkit(capsys, "inspect-attention", str(classify_run), "Parse the XML element.", "--out", str(tmp_path / "att"))
    assert code == 0, err
    assert json.loads((tmp_path / "att" / "tokens.json").read_text())["axes"]["tokens"][0] == "[CLS]"


def test_finetune_on_user_csv_and_bad_rows(capsys, tmp_path):
    good = tmp_path / "reviews.csv"
    rows = [("a lovely calm film", "pos"), ("dull and far too long", "neg")] * 30
    good.write_text("review,sentiment\n" + "".join(f"{t},{label}\n" for t, label in rows))
    columns = ["--set", "data.text_column=review", "--set", "data.label_column=sentiment", "--set", "data.vocab_size=100",
               "--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.layers=1", "--max-steps", "2"]
    code, _, err = tfkit(capsys, "train", "bert-finetune", "--data", str(good), "--out", str(tmp_path / "run"), *columns)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["neg", "pos"]
    bad = tmp_path / "bad.csv"
    bad.write_text("review,sentiment\n" + "".join(f"{t},{label}\n" for t, label in rows) + ",pos\n")
    code, _, err = tfkit(capsys, "train", "bert-finetune", "--data", str(bad), *columns)
    assert code == 2
    one_error_line(err, "lacks a text or a label")
    code, _, err = tfkit(capsys, "train", "bert-finetune", "--set", "task=translate")
    assert code == 2
    one_error_line(err, "unknown task 'translate' (valid: classify, classify-pair, tag)")


def test_finetune_from_a_hugging_face_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = SPECIALS + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    hf_config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(hf_config).save_pretrained(folder, safe_serialization=True)
    trainer = finetune(tmp_path, "run", "train.steps=2", "data.max_length=32", init=folder)
    assert trainer.model.bert.embed.tokens.num_embeddings == len(vocab)
    assert trainer.recipe.config["model"]["d_model"] == 32


def test_bio_spans():
    from tfkit.recipes.bert import entities

    assert entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == {(0, 2, "PER"), (3, 4, "LOC"), (4, 5, "LOC"), (5, 6, "ORG")}
    assert entities(["O", "O"]) == set()


def test_tag_learns_and_predicts_word_by_word(capsys, tmp_path):
    trainer = finetune(tmp_path, "tag", "task=tag", "data.vocab_size=1500", "train.steps=300")
    metrics = trainer.recipe.evaluate(trainer.model, "test")
    assert metrics["entity_f1"] > 60, metrics
    lines = tmp_path / "lines.txt"
    lines.write_text("Return None if the ValueError is raised by close().\n\nshort\n")
    code, out, err = tfkit(capsys, "predict", str(trainer.run_dir), str(lines))
    assert code == 0, err
    rows = out.split("\n")
    words = rows[0].split()
    assert len(words) == 9 and all(w.rsplit("/", 1)[1] in trainer.recipe.labels for w in words)
    assert rows[1] == "" and rows[2].startswith("short/")


def test_conll_files_train_and_malformed_lines_are_named(capsys, tmp_path):
    sentence = "Paris\tB-LOC\nis\tO\nnice\tO\n\n"
    good = tmp_path / "ner.conll"
    good.write_text("-DOCSTART- -X- O O\n\n" + sentence * 40)
    args = ["--set", "task=tag", "--set", "data.vocab_size=60", "--set", "model.d_model=32", "--set", "model.d_ff=64",
            "--set", "model.layers=1", "--max-steps", "2"]
    code, _, err = tfkit(capsys, "train", "bert-finetune", "--data", str(good), "--out", str(tmp_path / "run"), *args)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["O", "B-LOC"]
    bad = tmp_path / "bad.conll"
    bad.write_text(sentence * 3 + "Berlin\n")
    code, _, err = tfkit(capsys, "train", "bert-finetune", "--data", str(bad), *args)
    assert code == 2
    one_error_line(err, "bad.conll:13: expected a word and its tag")

"""BERT: masking, sentence pairs, tied weights, positions and parts by name, pretraining learns (with rotary
positions too), predict and inspection, HF import and export, fine-tuning tasks (classify, classify-pair, tag, qa)."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import numpy as np
import pytest
import torch

from conftest import TINY, one_error_line, quiet, recipe_config, tfkit
from tfkit import config as configs
from tfkit import registry
from tfkit import run as runs
from tfkit.errors import UsageError
from tfkit.recipes.bert.data import CLS, MASK, PAD, SEP, SPECIALS, pair_ids, train_wordpiece
from tfkit.recipes.bert.interop import bert_weights_from_hf, check_representable
from tfkit.recipes.bert.model import Bert, BertForPretraining, build_bert
from tfkit.recipes.bert.pretrain import IS_NEXT, NOT_NEXT, document_bounds, mask_tokens, nsp_pairs, sentence_rows
from tfkit.recipes.bert.qa import Question, Window, answer_f1, best_answers, normalize_answer, read_squad, window_answer, windows
from tfkit.train import start_training


def pretrain_config(*sets: str) -> dict:
    return recipe_config("bert-pretrain", *sets)


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
    sizes = [d % 5 + 1 for d in range(60)]  # documents of 1 to 5 sentences
    starts = np.cumsum([0, *sizes[:-1]])
    documents = np.stack([starts, starts + sizes], axis=1)
    document_of = np.repeat(np.arange(60), sizes)
    a, b, labels = nsp_pairs(documents, np.random.default_rng(0))
    last_sentences = set((starts + sizes - 1).tolist())
    assert sorted(a.tolist()) == [s for s in range(sum(sizes)) if s not in last_sentences]  # each sentence with a successor, once
    next_ = labels == IS_NEXT
    assert (b[next_] == a[next_] + 1).all()
    assert set(labels[~next_].tolist()) == {NOT_NEXT} and (document_of[b[~next_]] != document_of[a[~next_]]).all()
    assert (0 <= b).all() and (b < sum(sizes)).all()
    assert 0.4 < next_.mean() < 0.6


def test_sentence_rows_find_documents_in_both_layouts():
    # documents of 4 lines with a blank line after each: row 99 is blank, so the 21st document starts
    # the second of encode_once's batches of 100 rows; a leading and a doubled blank change nothing
    lines = ["", *(line for d in range(30) for line in [f"Story {d} line {s}." for s in range(4)] + [""]), ""]
    table = sentence_rows(datasets.Dataset.from_dict({"text": lines}), "text", "train")
    assert table["text"][:2] == ["Story 0 line 0.", "Story 0 line 1."]
    assert document_bounds(table).tolist() == [[4 * d, 4 * d + 4] for d in range(30)]
    # without blank rows each row is a document, split into sentences
    rows = datasets.Dataset.from_dict(
        {"text": ["The first one is here. The second one is there.", "Only this sentence stands alone."]}
    )
    table = sentence_rows(rows, "text", "train")
    assert table["text"] == ["The first one is here.", "The second one is there.", "Only this sentence stands alone."]
    assert document_bounds(table).tolist() == [[0, 2], [2, 3]]
    with pytest.raises(UsageError, match="holds int64, not text"):
        sentence_rows(datasets.Dataset.from_dict({"text": [1, 2]}), "text", "train")


def test_pair_layout_and_truncation():
    ids, segments = pair_ids([10, 11, 12], [20, 21], 64)
    assert ids == [CLS, 10, 11, 12, SEP, 20, 21, SEP] and segments == [0, 0, 0, 0, 0, 1, 1, 1]
    ids, segments = pair_ids(list(range(100, 120)), [7, 8, 9], 12)  # the longer side loses tokens
    assert ids == [CLS, *range(100, 106), SEP, 7, 8, 9, SEP]  # 12 tokens: A cut from 20 to 6, B kept
    assert segments.count(1) == 4


def test_a_max_length_beyond_the_learned_positions_fails_before_training():
    assert build_bert(50, pretrain_config("data.max_length=128")).embed.position.table.size(0) == 128
    with pytest.raises(UsageError, match="data.max_length 200 is more than the model's 128 positions"):
        build_bert(50, pretrain_config("data.max_length=200"))


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


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rotary", "none"])
def test_each_position_acts_where_it_belongs(position):
    """Without positions an encoder cannot tell order: permuting its input permutes its output. Each
    position breaks that; rotary from inside self-attention, adding nothing to the embeddings."""
    torch.manual_seed(0)
    bert = build_bert(50, pretrain_config(f"model.position={position}", "data.max_length=16")).eval()
    assert ("embed.position.table" in bert.state_dict()) == (position == "learned")
    assert (bert.encoder.layers[0].self_attn.rotary is not None) == (position == "rotary")
    ids = torch.tensor([[CLS, 10, 11, 12, 13, 14, 15, SEP]])
    order = torch.tensor([0, 6, 5, 4, 3, 2, 1, 7])
    with torch.no_grad():
        permuted = bert(ids[:, order], torch.zeros_like(ids))[0]
        hidden = bert(ids, torch.zeros_like(ids))[0][:, order]
    assert torch.allclose(permuted, hidden, atol=1e-5) == (position == "none")


def test_parts_by_name_reach_the_blocks_and_a_bert_export_takes_only_berts():
    bert = build_bert(50, pretrain_config("model.feed_forward=glu", "model.norm=rms_norm", "data.max_length=16"))
    block = bert.encoder.layers[0]
    assert type(block.feed_forward).__name__ == "GatedFeedForward" and isinstance(block.norm1, torch.nn.RMSNorm)
    assert block.norm1.eps == 1e-12  # model.norm_eps reaches whichever norm the blocks have
    check_representable(pretrain_config()["model"])
    check_representable(pretrain_config("model.attention=multi_head", "model.norm=layer_norm")["model"])
    for key, name in (("attention", "relative_multi_head"), ("feed_forward", "glu"), ("norm", "rms_norm")):
        with pytest.raises(UsageError, match=f"model.{key} '{name}' has no transformers BERT equivalent") as refused:
            check_representable(pretrain_config(f"model.{key}={name}")["model"])
        assert "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def rotary_run(tmp_path_factory):
    """A tiny bert-pretrain run with rotary positions, and its held-out masked-LM loss before and after."""
    config = pretrain_config("model.position=rotary", "train.steps=200", "train.save_every=200")
    trainer = start_training(config, tmp_path_factory.mktemp("rotary") / "run", torch.device("cpu"), console=quiet())
    before = trainer.recipe.evaluate(trainer.model, "test")["mlm_loss"]
    trainer.fit(progress=False)
    return trainer.run_dir, before, trainer.recipe.evaluate(trainer.model, "test")["mlm_loss"]


def test_pretraining_with_rotary_positions_learns(rotary_run):
    run_dir, before, after = rotary_run
    # measured: 6.42 (about ln 600, a uniform guess) → 5.48 after 200 steps
    assert after < before - 0.5, (before, after)
    _, model = runs.open_run(run_dir)
    assert "bert.embed.position.table" not in model.state_dict()


def test_a_rotary_model_has_no_hugging_face_export(capsys, rotary_run, tmp_path):
    code, _, err = tfkit(capsys, "export", str(rotary_run[0]), str(tmp_path / "hf"), "--to", "hf")
    assert code == 2
    one_error_line(err, "model.position 'rotary' has no transformers BERT equivalent")


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
    args = [
        "--data",
        str(corpus),
        "--max-steps",
        "2",
        "--set",
        "data.vocab_size=200",
        "--set",
        "model.d_model=32",
        "--set",
        "model.d_ff=64",
        "--set",
        "model.layers=1",
        "--set",
        "train.batch_size=8",
    ]
    code, out, err = tfkit(capsys, "train", "bert-pretrain", "--out", str(tmp_path / "run"), *args)
    assert code == 0, err
    # the sentences and their token ids live in Arrow files in datasets' cache, read batch by batch
    recipe = registry.get("recipe", "bert-pretrain")(runs.read_config(tmp_path / "run"))
    recipe.prepare(tmp_path / "run")
    assert recipe.ids["train"].cache_files and recipe.ids["validation"] is recipe.ids["train"]
    held_out = [len(recipe.documents[split]) for split in ("validation", "test")]
    assert held_out == [2, 2] and len(recipe.documents["train"]) == 30 - 4  # carved by documents, 5% each
    batch = next(recipe.train_batches(0))
    assert batch["token_ids"].shape[0] == 8 and (batch["token_ids"][:, 0] == CLS).all()
    one_line = tmp_path / "flat.txt"
    one_line.write_text("just one line\n")
    code, _, err = tfkit(capsys, "train", "bert-pretrain", "--data", str(one_line), "--max-steps", "1")
    assert code == 2
    one_error_line(err, "needs documents of two or more sentences")


def test_hugging_face_bert_imports_with_the_same_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
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


def finetune(tmp_path, name: str, *sets: str, init=None):
    recipe_cls = registry.get("recipe", "bert-finetune")
    defaults = recipe_cls.default_config()
    if init is not None:
        defaults = configs.merge(defaults, {**recipe_cls.pretrained_config(init), "init": str(init)})
    tiny = [s for s in TINY["bert-finetune"] if init is None or not s.startswith("model.")]  # init fixes the sizes
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
    config = configs.merge(
        recipe_cls.default_config(), {**recipe_cls.pretrained_config(pretrained_run), "init": str(pretrained_run)}
    )
    trainer = start_training(
        configs.resolve(config, None, ["train.steps=0"]), tmp_path / "run", torch.device("cpu"), console=quiet()
    )
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
    columns = [
        "--set",
        "data.text_column=review",
        "--set",
        "data.label_column=sentiment",
        "--set",
        "data.vocab_size=100",
        "--set",
        "model.d_model=32",
        "--set",
        "model.d_ff=64",
        "--set",
        "model.layers=1",
        "--max-steps",
        "2",
    ]
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
    one_error_line(err, "unknown task 'translate' (valid: classify, classify-pair, tag, qa)")


def test_finetune_from_a_hugging_face_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = SPECIALS + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    hf_config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(hf_config).save_pretrained(folder, safe_serialization=True)
    trainer = finetune(tmp_path, "run", "train.steps=2", "data.max_length=32", init=folder)
    assert trainer.model.bert.embed.tokens.num_embeddings == len(vocab)
    assert trainer.recipe.config["model"]["d_model"] == 32
    with pytest.raises(UsageError, match="model.position 'rotary' has no transformers BERT equivalent"):
        finetune(tmp_path, "rotary", "train.steps=2", "data.max_length=32", "model.position=rotary", init=folder)


def test_bio_spans():
    from tfkit.recipes.bert.tasks import entities

    assert entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == {
        (0, 2, "PER"),
        (3, 4, "LOC"),
        (4, 5, "LOC"),
        (5, 6, "ORG"),
    }
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
    args = [
        "--set",
        "task=tag",
        "--set",
        "data.vocab_size=60",
        "--set",
        "model.d_model=32",
        "--set",
        "model.d_ff=64",
        "--set",
        "model.layers=1",
        "--max-steps",
        "2",
    ]
    code, _, err = tfkit(capsys, "train", "bert-finetune", "--data", str(good), "--out", str(tmp_path / "run"), *args)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["O", "B-LOC"]
    bad = tmp_path / "bad.conll"
    bad.write_text(sentence * 3 + "Berlin\n")
    code, _, err = tfkit(capsys, "train", "bert-finetune", "--data", str(bad), *args)
    assert code == 2
    one_error_line(err, "bad.conll:13: expected a word and its tag")


# -- question answering -----------------------------------------------------------------------------
def squad_file(path, paragraphs):
    """A SQuAD v1.1 file of one article; paragraphs are (context, [(id, question, answer text, answer start)])."""
    written = [
        {"context": context, "qas": [{"id": i, "question": q, "answers": [{"text": t, "answer_start": s}]} for i, q, t, s in qas]}
        for context, qas in paragraphs
    ]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": written}]}))
    return path


def warehouse(n: int) -> list:
    """Contexts about numbered items, each with a question whose answer is a year in it."""
    colours = ["red", "green", "blue", "grey"]
    paragraphs = []
    for i in range(n):
        context = f"Item {i} is {colours[i % 4]}. It was built in {1900 + i} in the north hall."
        paragraphs.append((context, [(f"q{i}", f"When was item {i} built?", str(1900 + i), context.index(str(1900 + i)))]))
    return paragraphs


def test_squad_files_train_and_malformed_entries_are_named(capsys, tmp_path):
    good = squad_file(tmp_path / "items.json", warehouse(40))
    (question,) = read_squad(squad_file(tmp_path / "one.json", warehouse(1)))
    assert question == Question(
        "q0", "When was item 0 built?", "Item 0 is red. It was built in 1900 in the north hall.", [("1900", 31)]
    )
    args = [
        "--set",
        "task=qa",
        "--set",
        "data.vocab_size=100",
        "--set",
        "model.d_model=32",
        "--set",
        "model.d_ff=64",
        "--set",
        "model.layers=1",
        "--set",
        "data.max_length=32",
        "--set",
        "data.doc_stride=8",
        "--max-steps",
        "2",
    ]
    code, _, err = tfkit(capsys, "train", "bert-finetune", "--data", str(good), "--out", str(tmp_path / "run"), *args)
    assert code == 0, err
    recipe, _ = runs.open_run(tmp_path / "run")
    recipe.prepare(tmp_path / "run")
    contexts = {split: {q.context for q in rows} for split, rows in recipe.rows.items()}
    assert [len(contexts[s]) for s in ("train", "validation", "test")] == [36, 2, 2]  # held out whole contexts
    assert not contexts["train"] & (contexts["validation"] | contexts["test"])

    context = "Item 9 is blue. It was built in 1909."
    cases = [
        (
            [{"id": "q9", "answers": [{"text": "1909", "answer_start": 32}]}],
            "data[0].paragraphs[40].qas[0] (id q9) lacks 'question'",
        ),
        (
            [{"id": "q9", "question": "When?", "answers": [{"text": "1909", "answer_start": 99}]}],
            "data[0].paragraphs[40].qas[0] (id q9): answer_start 99 does not fit",
        ),
        (
            [{"id": "q9", "question": "When?", "answers": [{"text": "1909", "answer_start": 30}]}],
            "data[0].paragraphs[40].qas[0] (id q9): the answer '1909' is not the context's text at 30 ('n 19')",
        ),
        ([{"id": "q9", "question": "When?", "answers": []}], "data[0].paragraphs[40].qas[0] (id q9) has no answer"),
    ]
    for qas, fragment in cases:
        data = json.loads(good.read_text())
        data["data"][0]["paragraphs"].append({"context": context, "qas": qas})
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(data))
        code, _, err = tfkit(capsys, "train", "bert-finetune", "--data", str(bad), *args)
        assert code == 2
        one_error_line(err, f"{bad}: {fragment}")
    rows = tmp_path / "rows.jsonl"  # Hugging Face squad's layout, one row per line
    shifted = [
        {"question": q, "context": c, "answers": {"text": [t], "answer_start": [s + 1]}} for c, [(_, q, t, s)] in warehouse(20)
    ]
    rows.write_text("".join(json.dumps(row) + "\n" for row in shifted))
    code, _, err = tfkit(capsys, "train", "bert-finetune", "--data", str(rows), *args)
    assert code == 2
    one_error_line(err, "the train data's row 1: the answer '1900' is not the context's text at 32 ('900 ')")


def test_windows_overlap_by_the_stride_and_map_the_answer_back():
    context = " ".join(f"Sentence {i} names the module number {i * 7}." for i in range(30))
    answer = "module number 112"
    start = context.index(answer)
    tokenizer = train_wordpiece([context, "Which module is named?"], 200, SPECIALS)
    encoding = tokenizer.encode(context, add_special_tokens=False)
    question = tokenizer.encode("Which module is named?", add_special_tokens=False).ids
    found = windows(question, encoding.ids, encoding.offsets, (start, start + len(answer)), 40, 10)
    room = 40 - len(question) - 3
    assert len(found) > 3 and all(len(w.ids) == 40 for w in found[:-1]) and len(found[-1].ids) <= 40
    for before, after in zip(found, found[1:]):
        assert before.spans[-10:] == after.spans[:10] and len(before.spans) == room  # consecutive windows share 10 tokens
    assert found[0].spans[0] == encoding.offsets[0] and found[-1].spans[-1] == encoding.offsets[-1]
    for w in found:
        assert w.ids[: len(question) + 2] == [CLS, *question, SEP] and w.ids[-1] == SEP
        assert w.segments == [0] * (len(question) + 2) + [1] * (len(w.ids) - len(question) - 2)
    holding = [w for w in found if w.start]
    assert 1 <= len(holding) <= 2
    for w in holding:
        first, last = w.spans[w.start - w.context_start], w.spans[w.end - w.context_start]
        assert context[first[0] : last[1]] == answer
    assert all(w.start == w.end == 0 for w in found if w not in holding)  # the others point at [CLS]
    long_question = windows(list(range(100, 150)), encoding.ids, encoding.offsets, None, 40, 10)
    assert long_question[0].ids[:22] == [CLS, *range(100, 120), SEP]  # a question keeps half the window
    with pytest.raises(UsageError, match="data.doc_stride 20 must be smaller than the 17 context tokens"):
        windows(list(range(100, 150)), encoding.ids, encoding.offsets, None, 40, 20)


def test_answers_are_the_best_legal_span_across_windows():
    def window(question, spans):  # [CLS] one question token [SEP] context tokens [SEP]
        return Window([CLS, 7, SEP, *range(10, 10 + len(spans)), SEP], [0] * 3 + [1] * (len(spans) + 1), 0, 0, question, 3, spans)

    spans = [(0, 3), (4, 9), (10, 12), (13, 20)]
    found = [window(0, spans), window(0, spans), window(0, spans[1:]), window(1, spans[:2])]
    logits = [torch.full((len(w.ids), 2), -10.0) for w in found]
    logits[0][:3] = 50.0  # [CLS] and the question are never answers
    logits[0][5, 0] = logits[0][4, 1] = 9.0  # ends before it starts
    logits[1][3, 0] = logits[1][6, 1] = 6.0  # four tokens: longer than max_answer_length 3
    logits[2][3, 0], logits[2][4, 1] = 3.0, 2.5  # the best legal span: the third window's first two tokens
    logits[3][4, 0] = logits[3][4, 1] = 1.0  # another question's one-token answer

    def answers(max_answer_length):
        return best_answers(found, [window_answer(w, scores, max_answer_length) for w, scores in zip(found, logits)])

    assert answers(3) == {0: (4, 12), 1: (4, 9)}
    assert answers(4)[0] == (0, 20)  # four tokens are allowed now, and score 12


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("The Cat!") == normalize_answer("cat") == "cat"
    assert normalize_answer("  an  Apple, a day. ") == "apple day"
    assert answer_f1("Denver Broncos", "The Denver Broncos") == 1.0
    assert answer_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # precision 1, recall 2/3
    assert answer_f1("Santa Clara, California", "Levi's Stadium") == 0.0
    assert answer_f1("the", "a") == 0.0  # nothing left to compare, as the SQuAD script scores it


QA_SETTINGS = ["task=qa", "data.vocab_size=1500", "data.max_length=64", "data.doc_stride=16", "train.steps=300", "train.lr=0.002"]


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    return finetune(tmp_path_factory.mktemp("qa"), "run", *QA_SETTINGS)


def test_qa_learns_the_built_in_questions(qa_run):
    records = [r for r in runs.read_metrics(qa_run.run_dir) if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"] / 3
    recipe = qa_run.recipe
    assert max(Counter(w.question for w in recipe.examples["train"]).values()) > 1  # long contexts take several windows
    torch.manual_seed(1)
    untrained = recipe.build_model()
    for split in ("validation", "test"):
        trained, random_model = recipe.evaluate(qa_run.model, split), recipe.evaluate(untrained, split)
        assert set(trained) == {"exact_match", "f1"}
        assert trained["exact_match"] > 20 and trained["f1"] > 30, trained  # measured about 36 and 48
        assert random_model["exact_match"] < 5 and random_model["f1"] < 15, random_model


def test_qa_predict_and_inspect(capsys, qa_run, tmp_path):
    context = "Return None if the queue is empty. Raise ValueError if the timeout is negative."
    lines = tmp_path / "questions.tsv"
    lines.write_text(
        f"Raise which exception if the timeout is negative?\t{context}\nno context here\nWhat does it return?\t{context}\n"
    )
    code, out, err = tfkit(capsys, "predict", str(qa_run.run_dir), str(lines))
    assert code == 0, err
    rows = out.split("\n")[:3]
    assert rows[1] == "" and "questions.tsv:2: expected a question and its context separated by a tab" in err
    for row in (rows[0], rows[2]):
        answer, start, end = row.split("\t")
        assert answer and context[int(start) : int(end)] == answer
    asked = [("a1", "Raise which exception if the timeout is negative?", "ValueError", context.index("ValueError"))]
    squad = squad_file(tmp_path / "asked.json", [(context, asked)])
    jsonl = tmp_path / "asked.jsonl"
    jsonl.write_text(json.dumps({"id": "b2", "question": "Which constant is returned?", "context": context}) + "\n{not json\n")
    code, out, err = tfkit(capsys, "predict", str(qa_run.run_dir), str(squad), str(jsonl))
    assert code == 0, err
    first, second, third = out.split("\n")[:3]
    assert first.split("\t")[3] == "a1" and second.split("\t")[3] == "b2" and third == ""
    assert "asked.jsonl:2:" in err
    not_squad = tmp_path / "list.json"
    not_squad.write_text("[1, 2]")
    code, _, err = tfkit(capsys, "predict", str(qa_run.run_dir), str(not_squad))
    assert code == 2
    one_error_line(err, "list.json: not one JSON object in SQuAD's layout")
    code, _, err = tfkit(
        capsys,
        "inspect-attention",
        str(qa_run.run_dir),
        f"Which constant is returned?\t{context}",
        "--out",
        str(tmp_path / "att"),
    )
    assert code == 0, err
    described = json.loads((tmp_path / "att" / "tokens.json").read_text())
    tokens = described["axes"]["tokens"]
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2 and described["segments"][-1] == 1


def test_qa_starts_from_a_pretrain_run(pretrained_run, tmp_path):
    trainer = finetune(
        tmp_path, "qa", "task=qa", "data.max_length=64", "data.doc_stride=16", "train.steps=2", init=pretrained_run
    )
    assert (trainer.run_dir / "tokenizer.json").read_text() == (pretrained_run / "tokenizer.json").read_text()
    assert set(trainer.recipe.evaluate(trainer.model, "validation")) == {"exact_match", "f1"}

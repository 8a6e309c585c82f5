"""BERT's text: its vocabulary conventions (the special tokens at fixed ids, ``[CLS] A [SEP] B [SEP]``
inputs, the uncased WordPiece a run trains or a Hugging Face folder carries), and the built-in corpora,
English prose every Python carries: the docstrings of the standard library (read with ``ast``, never
imported) and the language reference in ``pydoc_data.topics``, turned into pretraining documents and
the four fine-tuning tasks' data (classify, classify-pair, tag, qa)."""

from __future__ import annotations

import ast
import functools
import random
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import datasets
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tfkit.data import SPLITS, Unusable, cached
from tfkit.errors import UsageError
from tfkit.progress import Preparing

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))


def pair_ids(a: list[int], b: list[int] | None, max_length: int, cls: int = CLS, sep: int = SEP) -> tuple[list[int], list[int]]:
    """[CLS] A [SEP] (B [SEP]) and segment ids, cutting tokens off the end of the longer side."""
    a, b = list(a), (list(b) if b is not None else None)
    budget = max_length - (3 if b is not None else 2)
    while len(a) + (len(b) if b else 0) > budget:
        (a if b is None or len(a) >= len(b) else b).pop()
    ids = [cls, *a, sep] + ([*b, sep] if b is not None else [])
    return ids, [0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2)


def load_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json, or a BERT vocab.txt (uncased WordPiece) as Hugging Face folders carry."""
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    if (folder / "vocab.txt").is_file():
        tokenizer = Tokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        return tokenizer
    raise UsageError(f"{folder} has no tokenizer.json or vocab.txt")


def check_specials(tokenizer: Tokenizer, where: Path | str) -> None:
    missing = [t for t in SPECIALS if tokenizer.token_to_id(t) is None]
    if missing or tokenizer.token_to_id("[PAD]") != PAD:
        raise UsageError(f"the tokenizer of {where} lacks {', '.join(missing) or '[PAD]'} at the ids tfkit's BERT expects")


def train_wordpiece(texts: Iterable[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """BERT's uncased WordPiece: lower-cased, accents stripped, punctuation split off, ## continuations.

    The same text gives the same tokenizer in every process. The trainer numbers the ## pieces in
    hash-map order, which changes from process to process, and breaks ties between equally frequent
    merges by those numbers (huggingface/tokenizers#1794): so every ## piece of a character is
    reserved up front in a fixed order, and the learned pieces are numbered in sorted order.

    ``texts`` is read twice: pass a list or an iterable that starts afresh (an iterator is listed)."""
    if iter(texts) is texts:
        texts = list(texts)
    normalizer = normalizers.BertNormalizer(lowercase=True)
    characters: set[str] = set()
    for text in texts:
        characters.update(text)
    letters = sorted(set(normalizer.normalize_str("".join(sorted(characters)))) - {" "})
    reserved = [*specials, *(f"##{c}" for c in letters)]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=reserved, show_progress=False)
    learner = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    learner.normalizer, learner.pre_tokenizer = normalizer, pre_tokenizers.BertPreTokenizer()
    learner.train_from_iterator(texts, trainer=trainer)

    learned = sorted(set(learner.get_vocab()) - set(specials))
    tokenizer = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate([*specials, *learned])}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens(specials)
    return tokenizer


# -- the user's text ---------------------------------------------------------------------------------
def text_folder(path: Path, column: str) -> datasets.DatasetDict | None:
    """A folder of .txt files (subfolders too; no train/validation/test files) as one training split
    of lines in ``column``, each file's documents (a blank line between them) ended by a blank row,
    read into datasets' cache with progress shown; None for any other source. A file that is not
    UTF-8 is skipped and counted (:class:`tfkit.data.Unusable`: a warning naming the first few, one
    error line past 1% of the files): in a folder of many, one bad file is noise, not a wrong folder."""
    if not path.is_dir() or any(next(path.glob(f"{split}.*"), None) for split in SPLITS):
        return None
    files = sorted(f for f in path.rglob("*.txt") if f.is_file())
    if not files:
        return None
    # the cache is named by these; a tuple, which datasets does not cut into one generator call per file
    stamps = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)

    def lines(stamps: tuple[tuple[str, int, int], ...]) -> Iterator[dict[str, str]]:
        with Preparing(f"reading the {len(stamps):,} text files", total=len(stamps), unit="files") as shown:
            for name, size, _ in stamps:
                try:
                    text = Path(name).read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    yield {column: "", "problem": f"{name}: not UTF-8 text (byte {e.start})"}
                    text = ""
                except OSError as e:
                    yield {column: "", "problem": f"{name}: {e.strerror or type(e).__name__}"}
                    text = ""
                for line in text.splitlines():
                    yield {column: line, "problem": ""}
                yield {column: "", "problem": ""}  # the file's last document ends here
                shown.advance(1, size)

    features = datasets.Features({column: datasets.Value("string"), "problem": datasets.Value("string")})
    rows = datasets.Dataset.from_generator(lines, features=features, gen_kwargs={"stamps": stamps})
    unusable = Unusable("text files", "train")
    problems = rows.filter(lambda problem: bool(problem), input_columns="problem")["problem"][:]
    for problem in problems:
        unusable.skip(problem)
    unusable.report(len(files))
    return datasets.DatasetDict({"train": rows.remove_columns("problem")})


# -- the built-in corpora ---------------------------------------------------------------------------
SKIPPED_PACKAGES = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip", "pydoc_data"}
CLASSIFY_PACKAGES = ["asyncio", "email", "tkinter", "unittest", "xml"]  # the built-in classify labels


def sentences(text: str) -> list[str]:
    """Prose sentences of a docstring: code, doctests and indented blocks are dropped."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(line.strip() for line in lines)):
            words = sentence.split()
            letters = sum(c.isalpha() for c in sentence)
            if 4 <= len(words) <= 50 and letters >= 0.7 * len(sentence.replace(" ", "")):
                out.append(sentence)
    return out


@functools.cache  # every built-in corpus starts here, and parsing the library takes seconds
def stdlib_documents() -> list[tuple[str, list[str]]]:
    """(package, sentences) for every docstring of the standard library with two or more sentences,
    in a fixed order, then one document per language-reference topic."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if SKIPPED_PACKAGES & set(parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        package = parts[0].removesuffix(".py")
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
        for node in nodes:
            found = sentences(ast.get_docstring(node) or "")
            if len(found) >= 2:
                documents.append((package, found))
    from pydoc_data.topics import topics

    for name in sorted(topics):
        found = sentences(topics[name])
        if len(found) >= 2:
            documents.append(("reference", found))
    return documents


def pretraining_corpus(seed: int) -> datasets.DatasetDict:
    """Rows of sentences with a blank row between documents (the text-file layout); documents are
    split 90/5/5 by seed."""

    def build() -> datasets.DatasetDict:
        documents = [doc for _, doc in stdlib_documents()]
        random.Random(seed).shuffle(documents)
        cut = len(documents) // 20
        parts = {"validation": documents[:cut], "test": documents[cut : 2 * cut], "train": documents[2 * cut :]}
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict({"text": [s for doc in docs for s in [*doc, ""]]})
                for split, docs in parts.items()
            }
        )

    return cached("stdlib-prose", {"seed": seed, "python": sys.version.split()[0]}, build)


def classify_corpus(seed: int) -> datasets.DatasetDict:
    """Which part of the standard library a docstring sentence comes from: a balanced, stratified
    70/10/20 split over CLASSIFY_PACKAGES."""

    def build() -> datasets.DatasetDict:
        by_package: dict[str, list[str]] = {p: [] for p in CLASSIFY_PACKAGES}
        for package, doc in stdlib_documents():
            if package in by_package:
                by_package[package] += doc
        smallest = min(len(s) for s in by_package.values())
        rng = random.Random(seed)
        texts, labels = [], []
        for label, package in enumerate(CLASSIFY_PACKAGES):
            chosen = rng.sample(sorted(set(by_package[package])), min(smallest, len(set(by_package[package]))))
            texts += chosen
            labels += [label] * len(chosen)
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=CLASSIFY_PACKAGES)})
        full = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
        rest, test = full.train_test_split(test_size=0.2, stratify_by_column="label", seed=seed).values()
        train, validation = rest.train_test_split(test_size=0.125, stratify_by_column="label", seed=seed).values()
        return datasets.DatasetDict({"train": train, "validation": validation, "test": test})

    return cached("stdlib-classify", {"seed": seed, "python": sys.version.split()[0]}, build)


def word_tag(word: str) -> str:
    """The built-in tagging scheme for docstring prose: constants, exception classes and calls."""
    bare = word.strip(".,;:!?'\"`()[]")
    if bare in ("True", "False", "None"):
        return "B-CONST"
    if re.fullmatch(r"[A-Z]\w*(Error|Exception|Warning)", bare):
        return "B-EXC"
    if re.fullmatch(r"[A-Za-z_][\w.]*\(\)[.,;:]?", word.strip("`")):
        return "B-CALL"
    return "O"


def tag_corpus(seed: int) -> datasets.DatasetDict:
    """Docstring sentences tagged word by word (BIO) with word_tag; sentences with at least one
    entity, split 70/10/20 by seed."""

    def build() -> datasets.DatasetDict:
        rows = {"tokens": [], "tags": []}
        for _, document in stdlib_documents():
            for sentence in document:
                words = sentence.split()
                tags = [word_tag(w) for w in words]
                if any(t != "O" for t in tags):
                    rows["tokens"].append(words)
                    rows["tags"].append(tags)
        full = datasets.Dataset.from_dict(rows)
        rest, test = full.train_test_split(test_size=0.2, seed=seed).values()
        train, validation = rest.train_test_split(test_size=0.125, seed=seed).values()
        return datasets.DatasetDict({"train": train, "validation": validation, "test": test})

    return cached("stdlib-tags", {"seed": seed, "python": sys.version.split()[0]}, build)


def pair_corpus(seed: int) -> datasets.DatasetDict:
    """Paraphrase identification on the classify corpus's sentences (like MRPC): half the pairs are a
    sentence and a lightly edited copy (one word dropped, two neighbours swapped), half a sentence
    and another one from the same part of the standard library; four pairs per training sentence."""
    rng = random.Random(seed)
    out = {}
    for split, rows in classify_corpus(seed).items():
        by_label: dict[int, list[str]] = {}
        for text, label in zip(rows["text"][:], rows["label"][:]):
            by_label.setdefault(label, []).append(text)
        texts, pairs, labels = [], [], []
        repeats = 4 if split == "train" else 1  # several edits and partners per training sentence
        for text, label in [row for row in zip(rows["text"][:], rows["label"][:]) for _ in range(repeats)]:
            if rng.random() < 0.5:
                words = text.split()
                del words[rng.randrange(len(words))]
                i = rng.randrange(len(words) - 1)
                words[i], words[i + 1] = words[i + 1], words[i]
                pairs.append(" ".join(words))
                labels.append(0)
            else:
                pairs.append(rng.choice([t for t in by_label[label] if t != text]))
                labels.append(1)
            texts.append(text)
        features = datasets.Features(
            {
                "text": datasets.Value("string"),
                "text_pair": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["paraphrase", "different"]),
            }
        )
        out[split] = datasets.Dataset.from_dict({"text": texts, "text_pair": pairs, "label": labels}, features=features)
    return datasets.DatasetDict(out)


WH_PHRASES = {"B-EXC": "which exception", "B-CONST": "which constant", "B-CALL": "which function"}


def passages(document: list[str], words: int = 150) -> list[list[str]]:
    """Runs of a document's consecutive sentences of at most ``words`` words (SQuAD's paragraphs
    average about 120)."""
    out, current, count = [], [], 0
    for sentence in document:
        if current and count + len(sentence.split()) > words:
            out.append(current)
            current, count = [], 0
        current.append(sentence)
        count += len(sentence.split())
    return out + [current] if current else out


def docstring_questions(passage: list[str]) -> Iterator[tuple[str, str, int]]:
    """(question, answer, answer start) about a passage, whose context is its sentences joined by
    spaces: each entity of word_tag in a sentence of 25 words or fewer, asked for by the sentence with
    the entity replaced by its wh-phrase; and, when exactly one sentence reads "Return(s) X." without
    entities, "What does it return?" with X (2 to 12 words) as the answer."""
    returns = [s for s in passage if re.match(r"Returns? ", s)]
    offset = 0
    for sentence in passage:
        if len(sentence.split()) <= 25:  # the question is the sentence: it must leave room for context
            for word in re.finditer(r"\S+", sentence):
                kind = word_tag(word.group())
                if kind == "O":
                    continue
                entity = re.search(r"[A-Za-z_][\w.]*\(\)" if kind == "B-CALL" else r"\w+", word.group())
                at = word.start() + entity.start()
                asked = (sentence[:at] + WH_PHRASES[kind] + sentence[at + len(entity.group()) :]).rstrip(".!?") + "?"
                yield asked[0].upper() + asked[1:], entity.group(), offset + at
        returned = re.fullmatch(r"(Returns? )(.+)\.", sentence)
        if (
            returned
            and len(returns) == 1
            and 2 <= len(returned[2].split()) <= 12
            and all(word_tag(w) == "O" for w in sentence.split())
        ):
            yield "What does it return?", returned[2], offset + len(returned[1])
        offset += len(sentence) + 1


def qa_corpus(seed: int) -> datasets.DatasetDict:
    """Questions about docstring passages in the layout of Hugging Face's ``squad`` (a question turned
    from a cloze sentence, as in Lewis et al., 2019; see docstring_questions); passages without a
    question are left out, documents split 80/10/10 by seed."""

    def build() -> datasets.DatasetDict:
        documents = list(dict.fromkeys(tuple(doc) for _, doc in stdlib_documents()))  # some docstrings repeat verbatim
        random.Random(seed).shuffle(documents)
        cut = len(documents) // 10
        parts = {"validation": documents[:cut], "test": documents[cut : 2 * cut], "train": documents[2 * cut :]}
        out = {}
        for split, docs in parts.items():
            rows = []
            for passage in (p for doc in docs for p in passages(list(doc))):
                for question, answer, start in docstring_questions(passage):
                    rows.append(
                        {
                            "id": f"{split}-{len(rows)}",
                            "question": question,
                            "context": " ".join(passage),
                            "answers": {"text": [answer], "answer_start": [start]},
                        }
                    )
            out[split] = datasets.Dataset.from_list(rows)
        return datasets.DatasetDict(out)

    return cached("stdlib-qa", {"seed": seed, "python": sys.version.split()[0]}, build)

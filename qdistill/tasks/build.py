"""A task from the data options the CLI, the demo and the benchmarks share, by name."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from torch import nn

from qdistill.data import load_dataset
from qdistill.data.model_tokenizer import ModelTokenizer, same_tokenizer
from qdistill.errors import QDistillError
from qdistill.files import cache_dir
from qdistill.format import is_packed, read_packed
from qdistill.models import hf_spec
from qdistill.tasks.classification import ImageClassification
from qdistill.tasks.embedding import SentenceEmbedding
from qdistill.tasks.language import LanguageModelling

NO_REFERENCE = "the embedding task measures a model against its teacher: give --teacher hf:DIR (the sentence encoder it was distilled from)"


def build_task(
    name: str,
    reference: nn.Module | None = None,
    *,
    dataset: str = "fashion-mnist",
    data_dir=None,
    val_size: int | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    text_dir=None,
    data=None,
    text_field: str = "text",
    token_files=None,
    tokenizer=None,
    model_tokenizer: ModelTokenizer | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    teacher: str | None = None,
):
    """Fashion-MNIST (or a dataset hook) in memory, a token corpus cut into windows, or the sentences of a
    text folder embedded as the `reference` encoder (the teacher, `hf:DIR`) embeds them.

    A language model's text (`text_dir`, or `data`: the files users have, `data.records`) is tokenized with the
    `model_tokenizer` (a Hugging Face model's own; `vocab_size` is then the model's), else with a byte-level
    BPE of `vocab_size` tokens trained on it."""
    if name == "classification":
        data = load_dataset(dataset, data_dir, val_size)
        return ImageClassification(data.subset(train_subset, test_subset) if train_subset is not None or test_subset is not None else data)
    if name == "embedding":
        return embedding_task(reference, teacher, tokenizer, text_dir, train_subset, test_subset, seq_len, data, text_field)
    from qdistill.data.text import load_python_docs, load_text_folder, load_token_files

    if sum(x is not None for x in (text_dir, data, token_files)) > 1:
        raise QDistillError("give one source of text: --text-dir, --data or --token-files")
    if token_files:
        if vocab_size is None:
            raise QDistillError("with --token-files, give the vocabulary size (--vocab-size N): token ids must be below it")
        return with_windows(load_token_files(*token_files, vocab_size=vocab_size, tokenizer=tokenizer), train_subset, test_subset, seq_len)
    if model_tokenizer is not None and vocab_size is None:
        raise ValueError("a model's tokenizer comes with the model's vocabulary size")
    vocab = 8192 if vocab_size is None else vocab_size
    if data is not None:
        from qdistill.data.records import records_corpus

        corpus = records_corpus(data, text_field, cache_dir(), vocab, model_tokenizer)
    elif text_dir:
        corpus = load_text_folder(text_dir, cache_dir(), vocab, tokenizer=model_tokenizer)
    else:
        corpus = load_python_docs(cache_dir(), vocab, tokenizer=model_tokenizer)
    return with_windows(corpus, train_subset, test_subset, seq_len)


def with_windows(corpus, train_subset, test_subset, seq_len) -> LanguageModelling:
    """A token corpus (its first tokens only, in quick runs) cut into windows of `seq_len` (default 128)."""
    if train_subset is not None or test_subset is not None:
        corpus = corpus.subset(train_subset, test_subset)
    return LanguageModelling(corpus, 128 if seq_len is None else seq_len)


def embedding_task(reference: nn.Module | None, teacher: str | None, tokenizer=None, text_dir=None, train_subset=None, test_subset=None, seq_len=None,
                   data=None, text_field: str = "text") -> SentenceEmbedding:
    """The sentences of `text_dir` (default: the Python docs) split by file, or the rows of `data` (each one
    a sentence or passage, `data.records`), tokenized with the teacher's tokenizer.json (`tokenizer`, else the
    one in the teacher's hf: directory)."""
    from qdistill.data.text import python_docs_dir

    if reference is None:
        raise QDistillError(NO_REFERENCE)
    path = tokenizer or (Path(teacher.removeprefix("hf:")) / "tokenizer.json" if teacher and teacher.startswith("hf:") else None)
    if path is None:
        raise QDistillError("no tokenizer for the embedding task: give --tokenizer TOKENIZER.JSON (the teacher's own)")
    if data is not None:
        if text_dir is not None:
            raise QDistillError("give one source of text: --text-dir or --data")
        return SentenceEmbedding.from_records(data, text_field, path, reference, train_subset, test_subset, 128 if seq_len is None else seq_len, cache_dir())
    folder = text_dir or python_docs_dir()
    return SentenceEmbedding.from_folder(folder, path, reference, train_subset, test_subset, 128 if seq_len is None else seq_len, cache_dir() / "logits")


def saved_task(path: str) -> dict:
    """The task a model file says it was trained on (`Task.describe()`), or {} when it does not say."""
    try:
        if is_packed(path):
            info = read_packed(path)[0].get("info", {})
        else:
            with safe_open(path, "pt") as f:
                info = {"task": json.loads((f.metadata() or {}).get("task", "{}"))}
    except Exception:  # an unreadable file is reported by the loader, with its own message
        return {}
    task = info.get("task")
    return task if isinstance(task, dict) else {}


def model_tokenizer(models, tokenizer=None) -> tuple[ModelTokenizer | None, int | None]:
    """The tokenizer a language model's text is encoded with, and the vocabulary the models have: `tokenizer`
    (a folder with a tokenizer.json, or that file), else the one the `models` bring: an hf: directory's own,
    or, for a model file trained with one, the tokenizer that run copied beside it. Two different ones are
    refused. (None, None) when there is none: text is then tokenized with a BPE trained on it."""
    found, vocab = None, None
    if tokenizer is not None:
        path = Path(tokenizer)
        found = ModelTokenizer.read(path.parent if path.name == "tokenizer.json" else path)
    for model in models:
        if not model:
            continue
        if model.startswith("hf:"):
            folder = Path(model.removeprefix("hf:"))
            own = ModelTokenizer.find(folder) if folder.is_dir() else None  # (a missing directory: the loader says so)
            size = hf_spec(folder, "causal-lm")["kwargs"]["config"].get("vocab_size") if own is not None else None
        else:
            task = saved_task(model)
            if not task.get("tokenizer"):
                continue
            own, size = ModelTokenizer.find(Path(model).parent) if tokenizer is None else found, task.get("vocab_size")
            if own is None or own.key != task["tokenizer"]:
                where = f"not the one in {tokenizer}" if tokenizer is not None else "which is not beside it"
                raise QDistillError(f"{model} was trained on text tokenized by a model's own tokenizer, {where}: give that model's folder with --tokenizer DIR")
        if own is None:
            continue
        found = same_tokenizer(found, own, "the models and --tokenizer" if tokenizer is not None else "the teacher and the student")
        vocab = vocab or (size if isinstance(size, int) and not isinstance(size, bool) else None)
    if found is None:
        return None, None
    vocab = vocab or found.size
    found.check_fits(vocab, "the model")
    return found, vocab

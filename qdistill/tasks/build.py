"""A task from the data options the CLI, the demo and the benchmarks share, by name."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qdistill.data import load_dataset
from qdistill.errors import QDistillError
from qdistill.files import cache_dir
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
    token_files=None,
    tokenizer=None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    teacher: str | None = None,
):
    """Fashion-MNIST (or a dataset hook) in memory, a token corpus cut into windows, or the sentences of a
    text folder embedded as the `reference` encoder (the teacher, `hf:DIR`) embeds them."""
    if name == "classification":
        data = load_dataset(dataset, data_dir, val_size)
        return ImageClassification(data.subset(train_subset, test_subset) if train_subset is not None or test_subset is not None else data)
    if name == "embedding":
        return embedding_task(reference, teacher, tokenizer, text_dir, train_subset, test_subset, seq_len)
    from qdistill.data.text import load_python_docs, load_text_folder, load_token_files

    if tokenizer and not token_files:  # (the embedding task reads a tokenizer.json of its own)
        raise QDistillError("--tokenizer goes with --token-files (a text corpus brings its own tokenizer)")
    if token_files:
        if vocab_size is None:
            raise QDistillError("with --token-files, give the vocabulary size (--vocab-size N): token ids must be below it")
        corpus = load_token_files(*token_files, vocab_size=vocab_size, tokenizer=tokenizer)
    elif text_dir:
        corpus = load_text_folder(text_dir, cache_dir(), 8192 if vocab_size is None else vocab_size)
    else:
        corpus = load_python_docs(cache_dir(), 8192 if vocab_size is None else vocab_size)
    if train_subset is not None or test_subset is not None:
        corpus = corpus.subset(train_subset, test_subset)
    return LanguageModelling(corpus, 128 if seq_len is None else seq_len)


def embedding_task(reference: nn.Module | None, teacher: str | None, tokenizer=None, text_dir=None, train_subset=None, test_subset=None, seq_len=None) -> SentenceEmbedding:
    """The sentences of `text_dir` (default: the Python docs) split by file, tokenized with the teacher's
    tokenizer.json (`tokenizer`, else the one in the teacher's hf: directory)."""
    from qdistill.data.text import python_docs_dir

    if reference is None:
        raise QDistillError(NO_REFERENCE)
    path = tokenizer or (Path(teacher.removeprefix("hf:")) / "tokenizer.json" if teacher and teacher.startswith("hf:") else None)
    if path is None:
        raise QDistillError("no tokenizer for the embedding task: give --tokenizer TOKENIZER.JSON (the teacher's own)")
    folder = text_dir or python_docs_dir()
    return SentenceEmbedding.from_folder(folder, path, reference, train_subset, test_subset, 128 if seq_len is None else seq_len, cache_dir() / "logits")

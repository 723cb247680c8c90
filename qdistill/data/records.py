"""Text in the files users have, one document per row: a Hugging Face `datasets` folder (`save_to_disk`), or
JSON lines, CSV, Parquet or plain-text files, read offline with the datasets library; `text_field` names
the column that holds the text.

The data's own train, validation and test splits are used (a folder's files named train*, validation*,
val*, dev*, test*); a split they lack is a seeded 5 % of the training rows, the same whatever the run's
seed. Rows are read a batch at a time from datasets' memory-mapped Arrow tables, so a corpus larger than
memory is tokenized (`text.cached_corpus`) without being held.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qdistill.data.text import SPLITS, TokenCorpus, cached_corpus, file_digest
from qdistill.data.model_tokenizer import ModelTokenizer
from qdistill.errors import QDistillError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}  # datasets' own readers
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}
HELD_OUT = 0.05  # of the training rows, for each of val and test where the data have no such split
SPLIT_SEED = 0
BATCH_ROWS = 1000


def _datasets():
    """The datasets library, offline and quiet: imported on use, so the rest of qdistill works without it."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise QDistillError("--data needs the datasets library: pip install 'qdistill[data]'") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _split_of(path: Path) -> str:
    """The split a data file's name says (train-00000-of-00002.parquet: train; test.jsonl: test), else train."""
    stem = path.name.split(".")[0].lower()
    for name, split in SPLIT_NAMES.items():
        if stem == name or stem.startswith((f"{name}-", f"{name}_")):
            return split
    return "train"


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def data_files(path: Path) -> dict[str, list[Path]]:
    """A data file, or a folder's data files by split; one kind of file only (datasets reads one format at a time)."""
    if not path.exists():
        raise QDistillError(f"--data {path}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
    if not files:
        raise QDistillError(f"--data {path}: no {', '.join(BUILDERS)} files there, and not a datasets folder (save_to_disk)")
    kinds = {BUILDERS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise QDistillError(f"--data {path}: qdistill reads {', '.join(BUILDERS)} files or a datasets folder (save_to_disk)")
    if len(kinds) > 1:
        raise QDistillError(f"--data {path} mixes {' and '.join(sorted(kinds))} files: keep one kind in the folder")
    by_split: dict[str, list[Path]] = {}
    for p in files:
        by_split.setdefault(_split_of(p) if path.is_dir() else "train", []).append(p)
    if "train" not in by_split:
        raise QDistillError(f"--data {path}: no training file there (name it train.*, or anything without a split's name)")
    return by_split


def load_splits(path: Path, text_field: str, cache_dir: Path) -> dict[str, "datasets.Dataset"]:  # noqa: F821
    """The data's splits as datasets (train, and val and test where they have them), each with a string `text_field`."""
    datasets = _datasets()
    try:
        if is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            loaded = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            named = {SPLIT_NAMES.get(k.lower()): v for k, v in loaded.items()}
        else:
            files = data_files(path)
            builder = BUILDERS[files["train"][0].suffix.lower()]
            extra = {"sample_by": "document"} if builder == "text" else {}  # a text file is one document
            loaded = datasets.load_dataset(builder, data_files={k: [str(p) for p in v] for k, v in files.items()}, cache_dir=str(cache_dir / "datasets"), **extra)
            named = dict(loaded)
    except QDistillError:
        raise
    except Exception as e:  # damaged files, a malformed row, an unreadable folder
        raise QDistillError(f"--data {path}: the datasets library cannot read it ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    named.pop(None, None)  # splits of other names
    if "train" not in named:
        raise QDistillError(f"--data {path} has no train split (it has {', '.join(loaded)}): the training rows must be in one named train")
    for split, ds in named.items():
        feature = ds.features.get(text_field)
        if feature is None:
            raise QDistillError(f"--data {path}: no column {text_field!r} in its {split} split (it has {', '.join(ds.column_names)}): name the text's column with --text-field")
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise QDistillError(f"--data {path}: the column {text_field!r} holds {feature}, not text: name the text's column with --text-field")
    return named


def held_out_rows(rows: int, missing: list[str]) -> np.ndarray:
    """Each training row's split: a seeded HELD_OUT of the rows for each split in `missing`, the rest train."""
    take = max(1, round(HELD_OUT * rows))
    if rows < len(missing) * take + 1:
        raise QDistillError(f"--data: its train split has {rows} rows, too few to hold out {' and '.join(missing)} rows from: give more text, or the splits themselves")
    assign = np.full(rows, "train", dtype=object)
    order = np.random.default_rng(SPLIT_SEED).permutation(rows)
    for i, split in enumerate(missing):
        assign[order[i * take : (i + 1) * take]] = split
    return assign


def split_sources(path: Path, text_field: str, cache_dir: Path) -> dict:
    """split -> a function giving the split's texts as lists, a batch of rows at a time; the data are loaded on first use."""
    loaded: dict = {}

    def rows(split: str):
        if not loaded:
            named = load_splits(path, text_field, cache_dir)
            missing = [s for s in ("val", "test") if s not in named]
            loaded.update(named, assign=held_out_rows(len(named["train"]), missing) if missing else None)
        if split != "train" and split in loaded:  # the data's own split
            ds, assign = loaded[split], None
        else:  # the training rows, less those held out (assign: None when none are)
            ds, assign = loaded["train"], loaded["assign"]
        for start, batch in zip(range(0, len(ds), BATCH_ROWS), ds.select_columns([text_field]).iter(batch_size=BATCH_ROWS)):
            texts = [t or "" for t in batch[text_field]]
            yield texts if assign is None else [t for t, s in zip(texts, assign[start : start + len(texts)]) if s == split]

    return {s: (lambda s=s: rows(s)) for s in SPLITS}


def source_files(path: Path) -> list[Path]:
    """The files the data are read from (all of a datasets folder's), checked readable as data first."""
    if is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [p for split in data_files(path).values() for p in split]  # (refuses what it cannot read, before any work)


def records_corpus(path, text_field: str, cache_dir, vocab_size: int, tokenizer: ModelTokenizer | None) -> TokenCorpus:
    """The documents of `path` (see the module) as a token corpus, cached like a text folder's; keyed by the
    contents of every file it is read from, the column and the way splits are made."""
    path, cache_dir = Path(path), Path(cache_dir)
    check_field(text_field)
    files = source_files(path)

    def hash_source(h) -> None:
        h.update(f"records\0{text_field}\0{HELD_OUT}\0{SPLIT_SEED}\0".encode())
        for p in files:
            rel = p.relative_to(path).as_posix() if path.is_dir() else p.name
            h.update(f"{rel}\0{file_digest(p)}\0".encode())

    mb = sum(p.stat().st_size for p in files) / 1e6
    return cached_corpus(path.resolve().name or "data", hash_source, split_sources(path, text_field, cache_dir), cache_dir, vocab_size, tokenizer, f"{len(files)} files ({mb:.1f} MB) of {path}")


def records_texts(path, text_field: str, cache_dir) -> dict[str, list[str]]:
    """Each split's texts, in memory: the sentences or passages of an embedding task."""
    check_field(text_field)
    path = Path(path)
    source_files(path)
    return {s: [t for batch in rows() for t in batch] for s, rows in split_sources(path, text_field, Path(cache_dir)).items()}


def check_field(text_field) -> None:
    if not isinstance(text_field, str) or not text_field:
        raise QDistillError("--text-field must name a column")

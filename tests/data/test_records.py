"""Text in the files users have (--data): datasets folders, JSON lines, CSV, Parquet and text files, read
offline by the datasets library into cached token corpora, with the data's own splits or seeded held-out ones."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from qdistill.data.records import held_out_rows, records_corpus  # noqa: E402
from qdistill.errors import QDistillError  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while python reads every line of this small text".split()


def documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 30)) + f" {i}." for i in range(n)]


def corpus(path, tmp_path, field="text", vocab=300):
    return records_corpus(path, field, tmp_path / "cache", vocab, None)


def split_texts(path: Path, field="text") -> dict[str, list[str]]:
    """What each split should hold: from files named by split."""
    return {s: [json.loads(line)[field] for line in (path / f"{name}.jsonl").read_text().splitlines()] for s, name in (("train", "train"), ("val", "validation"), ("test", "test"))}


def write_jsonl(path: Path, texts: list[str], field="text") -> Path:
    path.write_text("".join(json.dumps({field: t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_a_folder_of_split_files_keeps_its_splits_and_counts_their_bytes(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    texts = {"train": documents(30), "validation": documents(5, 1), "test": documents(6, 2)}
    for name, docs in texts.items():
        write_jsonl(folder / f"{name}.jsonl", docs)
    c = corpus(folder, tmp_path)
    tok = c.tokenizer()
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        assert tok.decode([int(i) for i in c.split(split) if i != 0]) == "".join(texts[name])  # every document, in order, id 0 between
        assert list(c.split(split)).count(0) == len(texts[name]) - 1
        assert c.split_bytes[split] == sum(len(t.encode()) for t in texts[name])
    assert sorted(os.listdir(folder)) == ["test.jsonl", "train.jsonl", "validation.jsonl"]  # nothing written beside the data


@pytest.mark.parametrize("kind", ["csv", "parquet", "saved", "saved-dict"])
def test_every_format_gives_the_same_corpus(tmp_path, kind):
    """The same documents as CSV, Parquet or a save_to_disk folder tokenize to the same streams as JSON lines."""
    docs = documents(40)
    reference = corpus(write_jsonl(tmp_path / "data.jsonl", docs), tmp_path)
    table = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))})
    path = tmp_path / f"data.{kind}"
    if kind == "csv":
        table.to_csv(str(path), index=False)
    elif kind == "parquet":
        table.to_parquet(str(path))
    elif kind == "saved":
        table.save_to_disk(str(path))
    else:
        datasets.DatasetDict({"train": table}).save_to_disk(str(path))
    c = corpus(path, tmp_path)
    for split in ("train", "val", "test"):
        assert np.array_equal(c.split(split), reference.split(split))
    assert c.key != reference.key  # (each source its own cache entry)


def test_missing_splits_are_a_seeded_share_of_the_training_rows(tmp_path):
    docs = documents(100)
    c = corpus(write_jsonl(tmp_path / "data.jsonl", docs), tmp_path)
    assign = held_out_rows(100, ["val", "test"])
    assert sum(assign == "val") == sum(assign == "test") == 5
    tok = c.tokenizer()
    for split in ("train", "val", "test"):
        assert tok.decode([int(i) for i in c.split(split) if i != 0]) == "".join(d for d, s in zip(docs, assign) if s == split)
    assert np.array_equal(held_out_rows(100, ["val", "test"]), assign)  # the same split every run, whatever the seed


def test_the_cache_is_reused_and_a_changed_file_is_tokenized_again(tmp_path, caplog):
    path = write_jsonl(tmp_path / "data.jsonl", documents(40))
    first = corpus(path, tmp_path)
    caplog.clear()  # (the first build's own log, captured when an earlier test left the logger at INFO)
    with caplog.at_level("INFO", logger="qdistill"):
        again = corpus(path, tmp_path)
    assert again.key == first.key and "tokenizing" not in caplog.text
    write_jsonl(path, documents(40, seed=5))
    assert corpus(path, tmp_path).key != first.key


def test_a_text_file_is_one_document(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name, seed in (("train", 0), ("validation", 1), ("test", 2)):
        (folder / f"{name}.txt").write_text("\n".join(documents(4, seed)))
    c = corpus(folder, tmp_path)
    assert all(0 not in c.split(s) for s in ("train", "val", "test"))  # one document per split: no separator


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("empty", "no .jsonl"),
    ("mixed", "mixes csv and json files"),
    ("field", "no column 'text' in its train split (it has body, n): name the text's column with --text-field"),
    ("numbers", "holds Value('int64'), not text"),
    ("damaged", "the datasets library cannot read it"),
    ("too-few", "too few to hold out"),
])
def test_bad_data_is_one_clear_error(tmp_path, case, message):
    path = tmp_path / "data"
    if case == "empty":
        path.mkdir()
    elif case == "mixed":
        path.mkdir()
        write_jsonl(path / "train.jsonl", documents(20))
        (path / "test.csv").write_text("text\nhello\n")
    elif case == "field":
        path = write_jsonl(tmp_path / "d.jsonl", documents(20), field="body")
    elif case == "numbers":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(20)))
    elif case == "damaged":
        path = tmp_path / "d.parquet"
        path.write_bytes(b"PAR1 not really parquet")
    elif case == "too-few":
        path = write_jsonl(tmp_path / "d.jsonl", documents(2))
    with pytest.raises(QDistillError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        corpus(path, tmp_path)
    assert not list((tmp_path / "cache" / "corpora").glob("*")) if (tmp_path / "cache" / "corpora").exists() else True  # no half-built corpus left


def test_a_script_in_the_data_folder_is_never_run(tmp_path):
    """datasets once ran a folder's loading script: qdistill names the files and their reader itself."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", documents(40))
    marker = tmp_path / "ran"
    (folder / "data.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    corpus(folder, tmp_path)
    assert not marker.exists()

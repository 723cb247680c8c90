import errno
import json
import os
import random
import shutil
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdistill import QDistillError
from qdistill.data import text
from qdistill.data.text import (
    PYTHON_DOCS,
    SPLITS,
    list_text_files,
    load_python_docs,
    load_text_folder,
    load_token_files,
    python_docs_dir,
    split_files,
)

PARAGRAPHS = [
    "Quantized distillation trains a small student against a large teacher.\n",
    "The ``quantize`` function rounds each weight to one of a few levels.\n\n.. note::\n\n   Buckets keep one outlier from widening every level.\n",
    "Café, naïve, façade: UTF-8 text with accents, and a Greek λ and a snowman ☃.\n",
    "Section\n=======\n\n* item one\n* item two\n\n:func:`len` returns the length of an object.\n",
]


def tiny_folder(root):
    """Eight small text files (three suffixes, a subfolder, non-ASCII, invalid UTF-8) and two files that are not text."""
    root.mkdir()
    (root / "sub").mkdir()
    names = ["a.txt", "b.rst", "c.md", "d.txt", "sub/e.rst.txt", "sub/f.txt", "sub/g.md", "h.rst"]
    for i, name in enumerate(names):
        body = "".join(PARAGRAPHS[(i + k) % len(PARAGRAPHS)] for k in range(3)) * (1 + i % 3)
        (root / name).write_text(f"File {name}\n\n{body}", encoding="utf-8")
    (root / "c.md").write_bytes((root / "c.md").read_bytes() + b"bad bytes \xff\xfe end\r\n")  # decoded with replacement
    (root / "d.txt").write_text("A literal <|endoftext|> inside a document is text, not a separator.\n" * 3)
    (root / "script.py").write_text("print('not text')\n")
    (root / "notes.txt.bak").write_text("ignored\n")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One corpus built from the tiny folder, shared by the tests that only read it."""
    base = tmp_path_factory.mktemp("text")
    folder = tiny_folder(base / "docs")
    return folder, base / "cache", load_text_folder(folder, base / "cache", vocab_size=300)


def documents(ids):
    """The token stream cut at id 0 into its documents."""
    cuts = np.flatnonzero(np.asarray(ids) == 0)
    return np.split(np.asarray(ids), cuts), len(cuts)


def test_text_files_are_listed_recursively_and_sorted(tmp_path):
    folder = tiny_folder(tmp_path / "docs")
    assert list_text_files(folder) == ["a.txt", "b.rst", "c.md", "d.txt", "h.rst", "sub/e.rst.txt", "sub/f.txt", "sub/g.md"]


def test_split_is_by_file_hash_and_deterministic():
    rels = [f"lib/module{i}.rst.txt" for i in range(2000)]
    splits = split_files(rels)
    assert sorted(sum(splits.values(), [])) == sorted(rels)  # every file in exactly one split
    assert [abs(len(splits[s]) / 2000 - f) < 0.03 for s, f in zip(SPLITS, (0.9, 0.05, 0.05))] == [True] * 3
    shuffled = random.Random(0).sample(rels, len(rels))
    assert split_files(shuffled) == splits  # does not depend on the listing order
    more = split_files([f"{d}/file{i}.md" for d in ("a", "z") for i in range(37)] + rels)
    assert all(set(splits[s]) <= set(more[s]) for s in SPLITS)  # adding files moves no other file


def test_a_small_folder_gets_every_split():
    for n in range(3, 12):
        splits = split_files([f"f{i}.txt" for i in range(n)])
        assert all(splits[s] for s in SPLITS) and sum(map(len, splits.values())) == n
        assert split_files([f"f{i}.txt" for i in range(n)]) == splits
    with pytest.raises(QDistillError, match="at least 3 files"):
        split_files(["a.txt", "b.txt"])


def test_each_split_is_its_files_in_order_separated_by_endoftext(built):
    folder, _, corpus = built
    tok = corpus.tokenizer()
    splits = split_files(list_text_files(folder))
    for s in SPLITS:
        docs, separators = documents(corpus.split(s))
        assert separators == len(splits[s]) - 1
        expected = [(folder / rel).read_bytes().decode("utf-8", errors="replace") for rel in splits[s]]
        assert [tok.decode(d[d != 0].tolist()) for d in docs] == expected


def test_tokens_bytes_dtype_and_summary(built):
    folder, _, corpus = built
    splits = split_files(list_text_files(folder))
    for s in SPLITS:
        a = corpus.split(s)
        assert isinstance(a, np.memmap) and a.ndim == 1 and a.dtype == np.uint16 and len(a) > 0
        assert int(a.max()) < corpus.vocab_size
        assert corpus.split_bytes[s] == sum(len((folder / r).read_bytes().decode("utf-8", errors="replace").encode()) for r in splits[s])
    assert corpus.vocab_size == corpus.tokenizer().get_vocab_size() <= 300 and corpus.name == "docs"
    assert corpus.summary() == {"vocab_size": corpus.vocab_size, "tokens": {s: len(corpus.split(s)) for s in SPLITS}, "bytes": corpus.split_bytes}
    assert corpus.tokenizer().token_to_id("<|endoftext|>") == 0
    with pytest.raises(QDistillError, match="unknown split"):
        corpus.split("validation")


def test_tokenizer_is_trained_on_the_train_split_only(built):
    folder, _, corpus = built
    train = split_files(list_text_files(folder))["train"]
    retrained = text._train_tokenizer((text._read(folder / r) for r in train), 300)
    assert json.loads(corpus.tokenizer_path.read_text()) == json.loads(retrained.to_str())


@settings(max_examples=150, deadline=None)
@given(s=st.text() | st.sampled_from(["", " ", "\r\n\t", "<|endoftext|>", "a<|endoftext|>b", "日本語 ✓ \x00 \U0001f600", "Ωmega  \n\n  x"]))
def test_tokenizer_round_trips_any_text(built, s):
    tok = built[2].tokenizer()
    ids = tok.encode(s).ids
    assert tok.decode(ids) == s and 0 not in ids  # a literal <|endoftext|> is text, never the separator


def test_cache_is_reused_without_retraining(built, monkeypatch):
    folder, cache, corpus = built

    def no_training(*a, **k):
        raise AssertionError("retrained")

    monkeypatch.setattr(text, "_train_tokenizer", no_training)
    again = load_text_folder(folder, cache, vocab_size=300)
    assert again.key == corpus.key and again.tokenizer_path == corpus.tokenizer_path
    assert all(np.array_equal(again.split(s), corpus.split(s)) for s in SPLITS)
    assert [p.name for p in (cache / "corpora").iterdir()] == [f"docs-{corpus.key}"]  # no temporary folder left


def test_key_follows_contents_and_vocab(tmp_path):
    folder = tiny_folder(tmp_path / "docs")
    first = load_text_folder(folder, tmp_path / "cache", vocab_size=300)
    assert load_text_folder(folder, tmp_path / "cache", vocab_size=320).key != first.key
    os.utime(folder / "a.txt", (0, 0))  # a new mtime alone changes nothing
    assert load_text_folder(folder, tmp_path / "cache", vocab_size=300).key == first.key
    (folder / "a.txt").write_text("Different words entirely.\n")
    assert load_text_folder(folder, tmp_path / "cache", vocab_size=300).key != first.key


def damage(corpus_dir, what):
    if what == "meta":
        (corpus_dir / "meta.json").write_text("{not json")
    elif what == "tokenizer":
        (corpus_dir / "tokenizer.json").write_text("{}")
    elif what == "truncated":
        raw = (corpus_dir / "train.npy").read_bytes()
        (corpus_dir / "train.npy").write_bytes(raw[: len(raw) // 2])
    elif what == "dtype":
        np.save(corpus_dir / "val.npy", np.load(corpus_dir / "val.npy").astype(np.int64))
    elif what == "pickle":
        np.save(corpus_dir / "test.npy", np.array([1, None], dtype=object), allow_pickle=True)
    elif what == "missing":
        (corpus_dir / "test.npy").unlink()
    elif what == "panicking tokenizer":
        broken_tokenizer(corpus_dir / "tokenizer.json", corpus_dir / "tokenizer.json", "panic")
    else:  # other ids of the right length and dtype, in a file or folder someone else could have written
        train = corpus_dir / "train.npy"
        np.save(train, np.zeros_like(np.load(train)))
        if what == "link":
            os.replace(train, corpus_dir.parent / "planted.npy")
            train.symlink_to(corpus_dir.parent / "planted.npy")
        elif what == "owner":
            os.chown(train, 12345, 12345)
        elif what == "writable":
            train.chmod(0o666)
        else:
            corpus_dir.chmod(0o777)


def broken_tokenizer(good, path, how):
    """`good` (a tokenizer.json) made one the tokenizers library fails on: a Split pre-tokenizer whose regex
    does not compile (an Exception when loaded), or a template naming a token it lacks (a panic, pyo3's
    PanicException, a BaseException, at each encode)."""
    spec = json.loads(good.read_text())
    if how == "bad regex":
        spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(("}, "behavior": "Isolated", "invert": False}
    else:
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {},
        }
    path.write_text(json.dumps(spec))
    return path


FOREIGN = ["link", "owner", "writable", "folder"]


@pytest.mark.parametrize("what", ["meta", "tokenizer", "truncated", "dtype", "pickle", "missing", "panicking tokenizer", *FOREIGN])
def test_a_damaged_cache_is_rebuilt(tmp_path, caplog, what):
    if what == "owner" and os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    folder = tiny_folder(tmp_path / "docs")
    first = load_text_folder(folder, tmp_path / "cache", vocab_size=300)
    expected = {s: np.array(first.split(s)) for s in SPLITS}
    damage(first.tokenizer_path.parent, what)
    caplog.clear()
    again = load_text_folder(folder, tmp_path / "cache", vocab_size=300)
    assert "rebuilding the token corpus" in caplog.text
    assert again.key == first.key and all(np.array_equal(again.split(s), expected[s]) for s in SPLITS)
    caplog.clear()
    assert load_text_folder(folder, tmp_path / "cache", vocab_size=300).key == first.key
    assert "WARNING" not in caplog.text  # rebuilt once, read since


def test_a_build_that_loses_the_race_uses_the_winners_copy(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "docs")
    build, calls = text._build, []

    def racing_build(*args):
        calls.append(args[-1])
        if len(calls) == 1:  # another process builds and publishes the same corpus meanwhile
            load_text_folder(folder, tmp_path / "cache", vocab_size=300)
        build(*args)

    monkeypatch.setattr(text, "_build", racing_build)
    corpus = load_text_folder(folder, tmp_path / "cache", vocab_size=300)
    assert len(calls) == 2 and not calls[0].exists()  # the loser's copy is deleted
    assert [p.name for p in (tmp_path / "cache" / "corpora").iterdir()] == [f"docs-{corpus.key}"]
    assert all(len(corpus.split(s)) for s in SPLITS)


def test_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(QDistillError, match="not found"):
        load_text_folder(tmp_path / "nowhere", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.py").write_text("x = 1\n")
    with pytest.raises(QDistillError, match="holds no .txt, .rst or .md files"):
        load_text_folder(tmp_path / "empty", tmp_path / "cache")
    folder = tiny_folder(tmp_path / "docs")
    for bad in (259, (1 << 20) + 1, 8192.0, True, "8192"):
        with pytest.raises(QDistillError, match="vocab_size"):
            load_text_folder(folder, tmp_path / "cache", vocab_size=bad)
    monkeypatch.setenv("QDISTILL_TEXT_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(QDistillError, match=r"apt-get install python3.11-doc.*--text-dir"):
        python_docs_dir()
    monkeypatch.setenv("QDISTILL_TEXT_DIR", str(folder))
    assert python_docs_dir() == folder
    corpus = load_python_docs(tmp_path / "cache", vocab_size=300)
    assert corpus.name == "python-docs" and corpus.tokenizer_path.parent.name == f"python-docs-{corpus.key}"
    monkeypatch.delenv("QDISTILL_TEXT_DIR")
    if PYTHON_DOCS.is_dir():
        assert python_docs_dir() == PYTHON_DOCS


def test_empty_split_is_refused(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text("")
    with pytest.raises(QDistillError, match="split has no text"):
        load_text_folder(folder, tmp_path / "cache", vocab_size=300)
    assert list((tmp_path / "cache" / "corpora").iterdir()) == []  # the failed build left nothing


def write_splits(folder, arrays, suffix=".npy"):
    folder.mkdir(exist_ok=True)
    paths = []
    for s, a in zip(SPLITS, arrays):
        path = folder / f"{s}{suffix}"
        np.save(path, a, allow_pickle=True) if suffix == ".npy" else path.write_bytes(np.asarray(a, "<u2").tobytes())
        paths.append(path)
    return paths


def test_token_files_load_memory_mapped(tmp_path, built):
    ids = [np.arange(10) % 7, np.array([1, 2, 3]), np.array([6, 0])]
    npy = load_token_files(*write_splits(tmp_path / "npy", [a.astype(np.int64) for a in ids]), vocab_size=7)
    bins = load_token_files(*write_splits(tmp_path / "bin", ids, ".bin"), vocab_size=7)
    for corpus in (npy, bins):
        assert [corpus.split(s).tolist() for s in SPLITS] == [a.tolist() for a in ids]
        assert isinstance(corpus.train, np.memmap) and corpus.split_bytes == {s: None for s in SPLITS} and corpus.vocab_size == 7
    assert npy.key == bins.key  # the same ids, whatever the file's dtype
    assert load_token_files(*write_splits(tmp_path / "npy", [a.astype(np.int64) for a in ids]), vocab_size=8).key != npy.key
    with pytest.raises(QDistillError, match="no tokenizer"):
        npy.tokenizer()
    tok_path = built[2].tokenizer_path
    with_tok = load_token_files(*write_splits(tmp_path / "npy", ids), vocab_size=300, tokenizer=tok_path)
    assert with_tok.tokenizer().get_vocab_size() == built[2].vocab_size and with_tok.tokenizer_path == tok_path
    with pytest.raises(QDistillError, match="more than vocab_size"):
        load_token_files(*write_splits(tmp_path / "npy", ids), vocab_size=7, tokenizer=tok_path)
    with pytest.raises(QDistillError, match="is not a tokenizer.json the tokenizers library can use"):
        load_token_files(*write_splits(tmp_path / "npy", ids), vocab_size=7, tokenizer=tmp_path / "npy" / "train.npy")


@pytest.mark.parametrize("how", ["bad regex", "panic"])
def test_a_tokenizer_json_the_library_fails_on_is_refused(tmp_path, built, how):
    ids = [np.array([1, 2, 3])] * 3
    bad = broken_tokenizer(built[2].tokenizer_path, tmp_path / "tokenizer.json", how)
    with pytest.raises(QDistillError, match=f"{bad} is not a tokenizer.json the tokenizers library can use"):
        load_token_files(*write_splits(tmp_path / "npy", ids), vocab_size=300, tokenizer=bad)
    shutil.copy(built[2].tokenizer_path, bad)
    corpus = load_token_files(*write_splits(tmp_path / "npy", ids), vocab_size=300, tokenizer=bad)
    broken_tokenizer(built[2].tokenizer_path, bad, how)  # changed after the ids were loaded, as for `generate`
    with pytest.raises(QDistillError, match="is not a tokenizer.json the tokenizers library can use"):
        corpus.tokenizer()


def test_cache_files_are_private_whatever_the_umask(tmp_path, caplog):
    """Files written with a umask of 002 would be group-writable, and then not trusted: rebuilt every time."""
    folder = tiny_folder(tmp_path / "docs")
    old = os.umask(0o002)
    try:
        first = load_text_folder(folder, tmp_path / "cache", vocab_size=300)
    finally:
        os.umask(old)
    corpus_dir = first.tokenizer_path.parent
    assert {p.name: p.stat().st_mode & 0o777 for p in corpus_dir.iterdir()} == dict.fromkeys(text.CACHED, 0o600)
    assert (corpus_dir.parent.stat().st_mode & 0o777, corpus_dir.stat().st_mode & 0o777) == (0o700, 0o700)
    load_text_folder(folder, tmp_path / "cache", vocab_size=300)
    assert "WARNING" not in caplog.text


def test_a_foreign_cache_that_cannot_be_moved_is_an_error(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "docs")
    first = load_text_folder(folder, tmp_path / "cache", vocab_size=300)
    first.tokenizer_path.parent.chmod(0o777)

    def refused(*args):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(text.os, "replace", refused)  # as for another user's folder in a sticky one
    with pytest.raises(QDistillError, match=r"cannot replace the cached token corpus .*remove it or set QDISTILL_CACHE to a folder of your own"):
        load_text_folder(folder, tmp_path / "cache", vocab_size=300)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([1, 2, 7]), r"val.npy: token id 7 \(its largest\) is outside the vocabulary \[0, 7\)"),
        (np.array([1, 9, 2, 30, 8]), r"val.npy: token id 30 \(its largest\) is outside the vocabulary \[0, 7\); .*\(more than 30\)"),
        (np.array([1, -1, 2]), r"token id -1 at position 1 is negative"),
        (np.array([1, None, 2], dtype=object), r"cannot be read as token ids"),
        (np.zeros((2, 3), np.int64), r"shape \(2, 3\), token ids must be 1-D"),
        (np.array([1.0, 2.0]), r"float64 values, token ids must be integers"),
        (np.array([True, False]), r"bool values"),
        (np.zeros(0, np.int64), r"holds 0 token ids"),
    ],
)
def test_bad_token_files_are_refused(tmp_path, bad, match):
    good = np.array([0, 1, 2])
    with pytest.raises(QDistillError, match=match):
        load_token_files(*write_splits(tmp_path, [good, bad, good]), vocab_size=7)


def test_bad_raw_and_missing_token_files(tmp_path):
    paths = write_splits(tmp_path, [np.array([0, 1, 2])] * 3, ".bin")
    paths[1].write_bytes(b"\x01\x00\x02")
    with pytest.raises(QDistillError, match="odd number of bytes"):
        load_token_files(*paths, vocab_size=7)
    paths[1].write_bytes(b"\x07\x00\x01\x00")
    with pytest.raises(QDistillError, match=r"val.bin: token id 7 \(its largest\)"):
        load_token_files(*paths, vocab_size=7)
    paths[0].with_suffix(".pt").write_bytes(b"\x01\x00")
    with pytest.raises(QDistillError, match="must end in .npy or .bin"):
        load_token_files(paths[0], paths[0].with_suffix(".pt"), paths[2], vocab_size=7)
    with pytest.raises(QDistillError, match="not found"):
        load_token_files(paths[0], tmp_path / "nowhere.npy", paths[2], vocab_size=7)
    with pytest.raises(QDistillError, match="vocab_size"):
        load_token_files(*paths, vocab_size=0)


@pytest.mark.slow
def test_python_docs_corpus(tmp_path):
    if not PYTHON_DOCS.is_dir():
        pytest.skip("Debian's python3.11-doc is not installed (apt-get install python3.11-doc)")
    start = time.perf_counter()
    corpus = load_python_docs(tmp_path / "cache", folder=PYTHON_DOCS)
    built_s = time.perf_counter() - start
    start = time.perf_counter()
    again = load_python_docs(tmp_path / "cache", folder=PYTHON_DOCS)
    cached_s = time.perf_counter() - start
    info = corpus.summary()
    print(f"\npython-docs: {info}, built in {built_s:.1f} s, cached load {cached_s:.2f} s")
    assert again.key == corpus.key and corpus.vocab_size == 8192 and corpus.name == "python-docs"
    assert all(info["tokens"][s] > 0 for s in SPLITS) and info["tokens"]["train"] > 10 * info["tokens"]["val"]
    assert sum(info["bytes"].values()) > 10_000_000
    tok = corpus.tokenizer()
    s = "def f(x):\n    return x ** 2  # naïve ✓\n"
    assert tok.decode(tok.encode(s).ids) == s


def test_a_tokenizer_is_checked_by_its_largest_id_not_its_count(tmp_path):
    """Three tokens whose ids reach 500: the ids it encodes need a vocabulary of 501, whatever its size says."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 500}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    paths = write_splits(tmp_path / "npy", [np.array([0, 1, 2])] * 3)
    with pytest.raises(QDistillError, match=r"has token ids up to 500, more than vocab_size 300 holds \(ids 0 to 299\)"):
        load_token_files(*paths, vocab_size=300, tokenizer=tmp_path / "tokenizer.json")
    assert load_token_files(*paths, vocab_size=501, tokenizer=tmp_path / "tokenizer.json").tokenizer().encode("world").ids == [500]

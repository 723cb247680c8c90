"""Token corpora for language modelling: a folder of text files (by default the reST sources of the
Python 3.11 documentation) tokenized once with a byte-level BPE and cached as .npy files that are
memory-mapped, so a corpus is never held in memory whole; or the user's own token files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qdistill.data.model_tokenizer import ModelTokenizer
from qdistill.errors import QDistillError
from qdistill.files import check_cache_entry

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the cached files or the way they are built change: old caches are then ignored
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")  # Debian package python3.11-doc
SUFFIXES = (".txt", ".rst", ".md")
SPLITS = ("train", "val", "test")
EOT = "<|endoftext|>"  # id 0: separates documents in the token streams
MIN_VOCAB, MAX_VOCAB = 260, 1 << 20
CHUNK = 1 << 22  # tokens per chunk when token files are checked
BATCH_BYTES = 4 << 20  # text encoded per encode_batch call
CACHED = ("meta.json", "tokenizer.json", *(f"{s}.npy" for s in SPLITS))  # the files of a cached corpus
PROBE = "Hello, world: a naïve café, 3.14 and <|endoftext|>.\n"  # encoded and decoded by every tokenizer loaded


@dataclass
class TokenCorpus:
    """Three 1-D streams of token ids, memory-mapped; documents separated by id 0 in built corpora.

    Built corpora store uint16 ids when vocab_size <= 65536, else uint32; user token files keep their
    own integer dtype (converting would load them into memory)."""

    name: str
    vocab_size: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    split_bytes: dict[str, int | None]  # UTF-8 bytes of each split's text, for bits per byte; None when unknown
    tokenizer_path: Path | None  # tokenizer.json of the tokenizers library; None for raw token files
    key: str  # hex digest of the token streams' source and tokenizer, for caches downstream
    model_tokenizer: ModelTokenizer | None = None  # the model's own tokenizer the text was encoded with; None: the corpus's own BPE

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise QDistillError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)

    def tokenizer(self):
        """The `tokenizers.Tokenizer`; special tokens written in text encode as plain text, as in the corpus,
        so decode(encode(s)) == s for any string."""
        if self.tokenizer_path is None:
            raise QDistillError(f"corpus {self.name} has no tokenizer (raw token files); pass a tokenizer.json with the token files")
        tok = load_tokenizer(self.tokenizer_path)
        tok.encode_special_tokens = True
        return tok

    def subset(self, train: int | None = None, test: int | None = None) -> "TokenCorpus":
        """The first `train` training tokens and the first `test` validation and test tokens (quick runs).

        A cut split's bytes are unknown (it ends mid-document), so it reports no bits per byte."""
        for n, what in ((train, "train"), (test, "test")):
            if n is not None and (not isinstance(n, int) or n < 2):
                raise QDistillError(f"{what} subset size must be an integer of at least 2 tokens, got {n!r}")
        cut = {"train": train, "val": test, "test": test}
        streams = {s: self.split(s)[: cut[s]] for s in SPLITS}
        sizes = {s: self.split_bytes.get(s) if len(streams[s]) == len(self.split(s)) else None for s in SPLITS}
        key = hashlib.sha256(f"{self.key}-{train}-{test}".encode()).hexdigest()[:16]
        return TokenCorpus(self.name, self.vocab_size, streams["train"], streams["val"], streams["test"], sizes, self.tokenizer_path, key, self.model_tokenizer)

    def summary(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "tokens": {s: int(len(self.split(s))) for s in SPLITS},
            "bytes": dict(self.split_bytes),
        }


def _tokenizers():
    """Imported on use so that the rest of qdistill works without the tokenizers library."""
    try:
        import tokenizers
    except ImportError as e:
        raise QDistillError("text corpora need the tokenizers library: pip install tokenizers") from e
    return tokenizers


@contextlib.contextmanager
def tokenizer_failures(message):
    """The tokenizers library's failures in the block as one QDistillError, `message(reason)`. It panics on some
    crafted files (a template naming a token it lacks): pyo3's PanicException derives from BaseException, so
    `except Exception` would let it through, and Rust's panic hook writes a backtrace to the standard error
    descriptor itself, which is sent to /dev/null for the block so that the user reads one error line."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise QDistillError(message((str(e).splitlines() or [type(e).__name__])[0][:200])) from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def load_tokenizer(path: Path):
    """A tokenizer.json (which may come from anyone) as a `tokenizers.Tokenizer`, tried on a sample text; any
    failure, a panic included, is one QDistillError (`tokenizer_failures`)."""
    tk = _tokenizers()
    with tokenizer_failures(lambda reason: f"{path} is not a tokenizer.json the tokenizers library can use ({reason}); pass the tokenizer.json the token ids were made with"):
        tok = tk.Tokenizer.from_file(str(path))
        tok.decode(tok.encode(PROBE).ids)
    return tok


def python_docs_dir() -> Path:
    folder = Path(os.environ.get("QDISTILL_TEXT_DIR") or PYTHON_DOCS)
    if not folder.is_dir():
        raise QDistillError(
            f"text folder {folder} not found: install Debian's python3.11-doc (apt-get install python3.11-doc, "
            "or `make data`) or pass --text-dir with a folder of text files"
        )
    return folder


def _check_vocab(vocab_size, low: int, high: int) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or not low <= vocab_size <= high:
        raise QDistillError(f"vocab_size must be an integer from {low} to {high}, got {vocab_size!r}")
    return int(vocab_size)


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def list_text_files(folder: Path) -> list[str]:
    """Relative POSIX paths of every .txt, .rst and .md file under `folder`, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")


def split_files(rels: list[str]) -> dict[str, list[str]]:
    """Each file to one split by a hash of its path (about 90/5/5), so adding files moves no other file.

    A split the hash leaves empty takes the file of highest hash from the largest split (small folders)."""
    if len(rels) < 3:
        raise QDistillError(f"a text corpus needs at least 3 files (one per split), found {len(rels)}")
    splits = {s: [] for s in SPLITS}
    for rel in sorted(rels):
        bucket = _path_hash(rel) % 100
        splits["train" if bucket < 90 else "val" if bucket < 95 else "test"].append(rel)
    for s in SPLITS:
        if not splits[s]:
            donor = max(SPLITS, key=lambda k: len(splits[k]))
            moved = max(splits[donor], key=_path_hash)
            splits[donor].remove(moved)
            splits[s].append(moved)
    return splits


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _hash_files(h, folder: Path, rels: list[str]) -> None:
    """Feed `h` the files' paths and contents."""
    for rel in rels:
        h.update(f"{rel}\0{file_digest(folder / rel)}\0".encode())


def file_digest(path: Path) -> str:
    """SHA-256 of a file's contents, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _train_tokenizer(texts, vocab_size: int):
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _file_batches(paths: list[Path]):
    """Lists of consecutive files of about BATCH_BYTES together."""
    batch, size = [], 0
    for p in paths:
        batch.append(p)
        size += p.stat().st_size
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_split(tok, batches, out: Path, dtype: np.dtype, separator: int | None) -> tuple[int, int]:
    """Encode the documents of `batches` (lists of texts), `separator` between documents (None: none), into the
    .npy `out` a batch at a time; returns (tokens, UTF-8 bytes)."""
    raw = out.with_suffix(".raw")
    n = nbytes = 0
    with open(raw, "wb") as f:
        for texts in batches:
            nbytes += sum(len(t.encode()) for t in texts)
            for enc in tok.encode_batch(texts, add_special_tokens=False):
                if n and separator is not None:
                    f.write(np.asarray([separator], dtype).tobytes())
                    n += 1
                f.write(np.asarray(enc.ids, dtype).tobytes())
                n += len(enc.ids)
    if n == 0:
        raise QDistillError(f"the {out.stem} split has no text: its documents are empty")
    src = np.memmap(raw, dtype=dtype, mode="r", shape=(n,))
    dst = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=(n,))
    for i in range(0, n, CHUNK):
        dst[i : i + CHUNK] = src[i : i + CHUNK]
    dst.flush()
    del src, dst
    raw.unlink()
    return n, nbytes


def _build(sources: dict, vocab_size: int, tokenizer: ModelTokenizer | None, name: str, key: str, dest: Path) -> None:
    """Each split's documents (`sources[split]()`: lists of texts) encoded with the model's `tokenizer`, or with a
    byte-level BPE trained on the train split only; meta.json written last."""
    if tokenizer is None:
        tok = _train_tokenizer((text for texts in sources["train"]() for text in texts), vocab_size)
        tok.save(str(dest / "tokenizer.json"))
        tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not a separator
        vocab, separator = tok.get_vocab_size(), 0
    else:
        shutil.copyfile(tokenizer.path, dest / "tokenizer.json")
        tok, vocab, separator = tokenizer.load(), vocab_size, tokenizer.eos_id
    tokens, nbytes = {}, {}
    for s in SPLITS:
        tokens[s], nbytes[s] = _encode_split(tok, sources[s](), dest / f"{s}.npy", _dtype(vocab), separator)
    meta = {"format": FORMAT, "name": name, "key": key, "vocab_size": vocab, "tokens": tokens, "bytes": nbytes}
    (dest / "meta.json").write_text(json.dumps(meta, indent=1))
    for file in CACHED:
        (dest / file).chmod(0o600)  # written with the umask's mode: a group-writable cache would not be trusted


def _open(path: Path, name: str, key: str, tokenizer: ModelTokenizer | None) -> TokenCorpus:
    """The cached corpus in `path`; raises on any damage (unreadable meta, tokenizer or arrays, wrong dtype or
    length) and on files someone else could have written."""
    check_cache_entry(path, *(path / file for file in CACHED))
    meta = json.loads((path / "meta.json").read_text())
    if meta["format"] != FORMAT or meta["key"] != key:
        raise ValueError("meta.json belongs to another corpus or format")
    vocab = int(meta["vocab_size"])
    tok_path = path / "tokenizer.json"
    if max(load_tokenizer(tok_path).get_vocab(with_added_tokens=True).values(), default=-1) >= vocab:
        raise ValueError("tokenizer.json has ids past meta.json's vocab_size")
    arrays = {}
    for s in SPLITS:
        a = np.load(path / f"{s}.npy", mmap_mode="r", allow_pickle=False)
        if a.ndim != 1 or a.dtype != _dtype(vocab) or len(a) != int(meta["tokens"][s]) or len(a) == 0:
            raise ValueError(f"{s}.npy has shape {a.shape} and dtype {a.dtype}, meta.json says {meta['tokens'][s]} tokens")
        arrays[s] = a
    return TokenCorpus(name, vocab, **arrays, split_bytes={s: int(meta["bytes"][s]) for s in SPLITS}, tokenizer_path=tok_path, key=key, model_tokenizer=tokenizer)


def _discard(path: Path) -> None:
    """Move a damaged or foreign cache aside (atomic), then delete it; another process may have done so already."""
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{path.name}-", dir=path.parent))
    try:
        os.replace(path, trash / path.name)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise QDistillError(f"cannot replace the cached token corpus {path} ({e.strerror}); remove it or set QDISTILL_CACHE to a folder of your own") from None
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def load_text_folder(folder, cache_dir, vocab_size: int = 8192, name: str | None = None, tokenizer: ModelTokenizer | None = None) -> TokenCorpus:
    """Every .txt/.rst/.md file under `folder` as a token corpus, split by file (`split_files`), tokenized with
    the model's own `tokenizer` (then `vocab_size` is the model's) or a byte-level BPE of `vocab_size` tokens
    trained on the train files (`cached_corpus`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QDistillError(f"text folder {folder} not found; pass --text-dir with a folder of .txt, .rst or .md files")
    rels = list_text_files(folder)
    if not rels:
        raise QDistillError(f"{folder} holds no .txt, .rst or .md files; pass --text-dir with a folder of text files")
    splits = split_files(rels)
    sources = {s: (lambda s=s: ([_read(p) for p in batch] for batch in _file_batches([folder / rel for rel in splits[s]]))) for s in SPLITS}
    mb = sum((folder / rel).stat().st_size for rel in rels) / 1e6
    what = f"{len(rels)} files ({mb:.1f} MB) of {folder}"
    return cached_corpus(name or folder.resolve().name or "text", lambda h: _hash_files(h, folder, rels), sources, cache_dir, vocab_size, tokenizer, what)


def cached_corpus(name: str, hash_source, sources: dict, cache_dir, vocab_size: int, tokenizer: ModelTokenizer | None, what: str) -> TokenCorpus:
    """The documents of `sources` (split -> a function giving lists of texts) as a token corpus, built on first
    use into cache_dir/corpora/<name>-<key> (a temporary folder renamed into place, so concurrent builds all
    succeed) and memory-mapped from there afterwards; a damaged cache is rebuilt. The key hashes the source
    (`hash_source(h)` feeds it), the vocabulary, the tokenizer (the model's, or the tokenizers version that
    trains the BPE) and FORMAT."""
    if tokenizer is None:
        vocab_size = _check_vocab(vocab_size, MIN_VOCAB, MAX_VOCAB)
    else:
        tokenizer.check_fits(_check_vocab(vocab_size, 1, 1 << 32), "the model")
    h = hashlib.sha256(json.dumps([FORMAT, vocab_size, tokenizer.key if tokenizer is not None else _tokenizers().__version__]).encode())
    hash_source(h)
    key = h.hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    final = Path(cache_dir) / "corpora" / f"{name}-{key}"
    final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    for _ in range(3):
        if os.path.lexists(final):
            try:
                return _open(final, name, key, tokenizer)
            except Exception as e:  # whatever the damage (json, numpy, tokenizers errors), the cure is a rebuild
                log.warning("rebuilding the token corpus, the cached one in %s is unreadable: %s", final, e)
                _discard(final)
        how = f"the tokenizer of {tokenizer.folder}" if tokenizer is not None else f"a {vocab_size}-token byte-level BPE"
        log.info("tokenizing %s with %s into %s", what, how, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            _build(sources, vocab_size, tokenizer, name, key, tmp)
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.exists():
                    raise
                # another process published the same corpus first: the next pass opens its copy
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise QDistillError(f"could not build a readable token corpus in {final} in three tries; delete it and retry")


def load_python_docs(cache_dir, vocab_size: int = 8192, folder=None, tokenizer: ModelTokenizer | None = None) -> TokenCorpus:
    """The reST sources of the Python 3.11 documentation (about 12 MB in 497 files) as a token corpus."""
    return load_text_folder(folder or python_docs_dir(), cache_dir, vocab_size, name="python-docs", tokenizer=tokenizer)


def _token_file(path: Path) -> np.ndarray:
    """A .npy array (never unpickled) or a raw .bin of little-endian uint16, memory-mapped."""
    fix = "save the ids as a 1-D integer array with np.save, or as raw uint16 in a .bin file"
    if not path.is_file():
        raise QDistillError(f"token file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".bin":
        if path.stat().st_size % 2:
            raise QDistillError(f"{path} has an odd number of bytes, so it is not raw uint16 token ids; {fix}")
        if path.stat().st_size < 4:  # a window needs a token and the one after it
            raise QDistillError(f"token file {path} holds {path.stat().st_size // 2} token ids: a split needs at least 2")
        return np.memmap(path, dtype="<u2", mode="r")
    if suffix != ".npy":
        raise QDistillError(f"token file {path} must end in .npy or .bin; {fix}")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise QDistillError(f"{path} cannot be read as token ids ({e}); {fix}") from e
    if not isinstance(a, np.ndarray):  # a zip archive (.npz) named .npy
        raise QDistillError(f"{path} is an archive of arrays, not one array of token ids; {fix}")
    if a.ndim != 1:
        raise QDistillError(f"{path} holds an array of shape {a.shape}, token ids must be 1-D; {fix}")
    if not np.issubdtype(a.dtype, np.integer):
        raise QDistillError(f"{path} holds {a.dtype} values, token ids must be integers; {fix}")
    if len(a) < 2:  # a window needs a token and the one after it
        raise QDistillError(f"token file {path} holds {len(a)} token ids: a split needs at least 2")
    return a


def load_token_files(train, val, test, vocab_size: int, tokenizer=None) -> TokenCorpus:
    """The user's own token ids, one file per split, every id checked to lie in [0, vocab_size) a chunk at a time.

    `tokenizer` is an optional tokenizer.json (tokenizers library) that produced the ids."""
    vocab_size = _check_vocab(vocab_size, 1, 1 << 32)
    h = hashlib.sha256(json.dumps([FORMAT, "tokens", vocab_size]).encode())
    arrays = {}
    for s, path in zip(SPLITS, (train, val, test)):
        a = arrays[s] = _token_file(Path(path))
        largest = 0
        for i in range(0, len(a), CHUNK):
            c = np.asarray(a[i : i + CHUNK])
            negative = np.flatnonzero(c < 0)
            if len(negative):
                j = int(negative[0])
                raise QDistillError(f"{path}: token id {int(c[j])} at position {i + j} is negative; token ids must be from 0 to {vocab_size - 1}")
            largest = max(largest, int(c.max()))
            h.update(c.astype("<u4").tobytes())  # the same ids hash alike whatever the file's dtype
        if largest >= vocab_size:  # the largest, not the first: the vocabulary size the ids need
            raise QDistillError(
                f"{path}: token id {largest} (its largest) is outside the vocabulary [0, {vocab_size}); "
                f"pass the vocabulary size the ids were made with (more than {largest}), or ids made with the model's own tokenizer"
            )
        h.update(f"\0{s}\0".encode())
    tok_path = None
    if tokenizer is not None:
        tok_path = Path(tokenizer)
        tok = load_tokenizer(tok_path)
        top = max(tok.get_vocab().values(), default=0)  # its largest id, not its count: ids may skip numbers
        if top >= vocab_size:
            raise QDistillError(f"tokenizer {tok_path} has token ids up to {top}, more than vocab_size {vocab_size} holds (ids 0 to {vocab_size - 1})")
        h.update(tok_path.read_bytes())
    return TokenCorpus("tokens", vocab_size, **arrays, split_bytes={s: None for s in SPLITS}, tokenizer_path=tok_path, key=h.hexdigest()[:16])

"""A Hugging Face model's own tokenizer, so that text reaches the model as the ids it was trained on.

Read as data from the model's folder: its tokenizer.json with the tokenizers library (the very object
transformers' fast tokenizer wraps, so the ids are AutoTokenizer's) and its end-of-text token from
tokenizer_config.json (or special_tokens_map.json), which separates documents in a token stream. Nothing
the folder names is imported or run. A folder with a slow tokenizer only (a sentencepiece model, no
tokenizer.json) is refused with the one line that converts it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from qdistill.errors import QDistillError

MAX_CONFIG_BYTES = 1 << 20  # tokenizer_config.json (chat templates included) is kilobytes
CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")  # where the end-of-text token is named, in order
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)  # what transformers' tokenizers read: data files, copied as they are, never loaded here


@dataclass(frozen=True)
class ModelTokenizer:
    """`folder`/tokenizer.json, with the id that ends a document (None when the tokenizer names none: documents
    are then joined as they are). `key` names its vocabulary, merges and end token, for caches and packed files."""

    folder: Path
    eos_id: int | None
    size: int  # its largest id + 1: the least vocabulary a model using it has
    key: str

    @property
    def path(self) -> Path:
        return self.folder / "tokenizer.json"

    @classmethod
    def find(cls, folder) -> "ModelTokenizer | None":
        """The tokenizer in `folder` (a model's save_pretrained directory), or None when it holds no tokenizer files."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls.read(folder)
        slow = [name for name in ("tokenizer.model", "spiece.model", "vocab.json", "vocab.txt") if (folder / name).is_file()]
        if slow:
            raise QDistillError(
                f"{folder} holds a slow tokenizer ({slow[0]}) but no tokenizer.json, which qdistill reads: write it once with "
                f"python -c \"from transformers import AutoTokenizer as T; T.from_pretrained('{folder}').save_pretrained('{folder}')\""
            )
        return None

    @classmethod
    def read(cls, folder) -> "ModelTokenizer":
        from qdistill.data.text import load_tokenizer  # (imports the tokenizers library on use)

        folder = Path(folder)
        tok = load_tokenizer(folder / "tokenizer.json")
        eos = end_token(folder)
        eos_id = tok.token_to_id(eos) if eos is not None else None
        if eos is not None and eos_id is None:
            raise QDistillError(f"{folder}: the end-of-text token {eos!r} its tokenizer config names is not in its tokenizer.json: give the model's own tokenizer files")
        try:
            canonical = json.dumps(json.loads((folder / "tokenizer.json").read_text()), sort_keys=True)
        except (OSError, ValueError, RecursionError):  # (load_tokenizer read it already: this is a race)
            raise QDistillError(f"{folder / 'tokenizer.json'} cannot be read as JSON") from None
        size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        key = hashlib.sha256(f"{canonical}\0{eos_id}".encode()).hexdigest()[:16]
        return cls(folder, eos_id, size, key)

    def load(self):
        """The `tokenizers.Tokenizer`; special tokens written in text encode as plain text, so decode(encode(s)) == s."""
        from qdistill.data.text import load_tokenizer

        tok = load_tokenizer(self.path)
        tok.encode_special_tokens = True
        return tok

    def copy_to(self, dest: Path) -> None:
        """Its files (`find_tokenizer_files`) copied into `dest`, as a save_pretrained directory holds them."""
        for f in find_tokenizer_files(self.folder):
            shutil.copyfile(f, Path(dest) / f.name)

    def check_fits(self, vocab_size: int, model: str) -> None:
        """Refuse a tokenizer whose ids the model (with `vocab_size` embeddings) has no rows for."""
        if self.size > vocab_size:
            raise QDistillError(f"the tokenizer in {self.folder} has ids up to {self.size - 1} but {model} embeds {vocab_size} tokens: give the model's own tokenizer")


def end_token(folder: Path) -> str | None:
    """The eos_token that tokenizer_config.json (else special_tokens_map.json) names, as text; None if neither does."""
    for name in CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise QDistillError(f"{path} is over {MAX_CONFIG_BYTES >> 20} MB: not a tokenizer config")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            raise QDistillError(f"{path} is not valid JSON: give the model's own tokenizer files") from None
        eos = config.get("eos_token") if isinstance(config, dict) else None
        if isinstance(eos, dict):  # {"content": "</s>", "lstrip": false, ...}
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def same_tokenizer(a: ModelTokenizer | None, b: ModelTokenizer | None, what: str = "the teacher and the student") -> ModelTokenizer | None:
    """The one tokenizer of two models (either may have none); two different ones are refused: their ids mean different tokens."""
    if a is not None and b is not None and a.key != b.key:
        raise QDistillError(f"{what} have different tokenizers ({a.folder} and {b.folder}): their token ids mean different text; distill between models that share a tokenizer")
    return a or b


def find_tokenizer_files(tokenizer_dir: str | Path) -> list[Path]:
    """The tokenizer files a directory holds (one clear error when it holds none).

    A file may be a link only into the model's own folder: Hugging Face's cache links a snapshot's files to
    the blobs beside it (`models--x/snapshots/REV/f -> ../../blobs/...`). A link elsewhere, planted in a
    folder someone gave you, would copy a file of yours into a model you then ship."""
    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise QDistillError(f"--tokenizer {folder}: no such directory; give the teacher's Hugging Face directory (nothing was written)")
    home = folder.resolve().parent.parent if folder.resolve().parent.name == "snapshots" else folder.resolve()
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    for f in files:
        if f.is_symlink() and not f.resolve().is_relative_to(home):
            raise QDistillError(f"--tokenizer {folder}: {f.name} is a link to a file outside that folder ({f.resolve()}): copy the tokenizer's own file there (nothing was written)")
    if not files:
        raise QDistillError(f"--tokenizer {folder}: no tokenizer files there (tokenizer.json, vocab.txt, ...); give the teacher's Hugging Face directory (nothing was written)")
    return files

"""Out to Hugging Face: a quantized transformers model as a plain save_pretrained directory.

The weights are the quantized values, dequantized to float32: any transformers install opens the
directory unchanged (`AutoModelForCausalLM.from_pretrained(dir)`) and computes what the packed model
computes. The packed file stays the small one; this is the format other tools read.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from qdistill.data.model_tokenizer import find_tokenizer_files
from qdistill.errors import QDistillError
from qdistill.files import current_umask
from qdistill.quant import detach, quantized_tensors
from qdistill.runtime.load import load_packed


def save_pretrained_dir(model: nn.Module, out_dir: str | Path, overwrite: bool = False, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a transformers model as a save_pretrained directory, with the tokenizer files of `tokenizer_dir`
    (the teacher's directory) beside it; quantizers attached to the model are baked into a copy first
    (`save_pretrained` and `tie_weights` fail on parametrized weights). An existing directory that holds
    files is refused unless `overwrite`, and then only the files written change. Everything is written
    into a hidden directory beside OUT_DIR first: a failure or a kill never leaves half a model there."""
    out = Path(out_dir)
    if not hasattr(model, "save_pretrained"):
        raise QDistillError(f"a {type(model).__name__} is not a transformers model: only hf: models and the gpt-* presets export to Hugging Face")
    if out.exists() and not out.is_dir():
        raise QDistillError(f"{out} is a file, not a directory: choose a directory to write the model into (nothing was written)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise QDistillError(f"{out} already exists and is not an empty directory; choose another or pass --overwrite (nothing was written)")
    tokenizer_files = find_tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    if quantized_tensors(model):
        model = detach(copy.deepcopy(model), keep_quantized=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        model.save_pretrained(tmp)
        for f in tokenizer_files:
            shutil.copyfile(f, Path(tmp) / f.name)
        out.mkdir(exist_ok=True)
        for f in Path(tmp).iterdir():
            os.chmod(f, 0o666 & ~current_umask())  # safetensors writes 0600 whatever the umask
            os.replace(f, out / f.name)
    return out


def export_hf(packed: str | Path, out_dir: str | Path, overwrite: bool = False, tokenizer_dir: str | Path | None = None) -> Path:
    """The model in a packed file, rebuilt from the file alone, as a save_pretrained directory."""
    if Path(packed).resolve().parent == Path(out_dir).resolve():  # transformers' own file names could replace it
        raise QDistillError(f"{out_dir} holds {packed}: write the exported directory elsewhere (nothing was written)")
    model, _ = load_packed(packed)
    return save_pretrained_dir(model, out_dir, overwrite, tokenizer_dir)

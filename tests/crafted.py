"""Files crafted as an attacker would make them, for the tests and for bench/bad_inputs.py (no pytest needed)."""

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qdistill.format.packed import _digest


def rewrite(path, out, edit_meta=None, edit_tensors=None):
    """Copy a packed file with edited metadata or tensors and a *recomputed* checksum, as an attacker would."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["qdistill"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("sha256")
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    meta["sha256"] = _digest(meta, tensors)
    save_file(tensors, str(out), metadata={"qdistill": json.dumps(meta)})
    return out


def floats_into_uint8_blob(path, out):
    """The kept float tensors rewritten as whole numbers into a well-typed blob fp.uint8 (once cast silently)."""

    def move(meta):
        for entry in meta["kept"]:
            if entry["blob"] == "fp.float32":
                entry["blob"] = "fp.uint8"

    def retype(tensors):
        tensors["fp.uint8"] = tensors.pop("fp.float32").abs().round().clamp(max=255).to(torch.uint8)

    return rewrite(path, out, edit_meta=move, edit_tensors=retype)

"""Model presets and user models, described by a small JSON-able spec so a saved file can rebuild its model.

A spec is {"factory": "package.module:function", "kwargs": {...}}; presets are names
("tiny", "small", "medium", "large" students; "resnet-small", "resnet" teachers).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qdistill.data.dataset import load_object
from qdistill.errors import QDistillError
from qdistill.models.convnet import STUDENT_PRESETS, ConvStudent, conv_student
from qdistill.models.resnet import TEACHER_PRESETS, PreActResNet, resnet_teacher


def model_spec(name: str, in_channels: int = 1, num_classes: int = 10, **kwargs) -> dict:
    """Turn a preset name or 'package.module:factory' into a spec."""
    if name in STUDENT_PRESETS:
        return {"factory": "qdistill.models:conv_student", "kwargs": {"size": name, "in_channels": in_channels, "num_classes": num_classes}}
    if name in TEACHER_PRESETS:
        return {"factory": "qdistill.models:resnet_teacher", "kwargs": {"size": name, "in_channels": in_channels, "num_classes": num_classes}}
    if ":" in name:
        return {"factory": name, "kwargs": kwargs}
    presets = ", ".join([*STUDENT_PRESETS, *TEACHER_PRESETS])
    raise QDistillError(f"unknown model {name!r}: use a preset ({presets}) or 'package.module:factory'")


def build_model(spec: dict) -> nn.Module:
    factory = load_object(spec["factory"], "model factory")
    try:
        model = factory(**spec.get("kwargs", {}))
    except TypeError as e:
        raise QDistillError(f"cannot build model {spec['factory']} with {spec.get('kwargs', {})}: {e}") from e
    if not isinstance(model, nn.Module):
        raise QDistillError(f"model factory {spec['factory']} returned {type(model).__name__}, not an nn.Module")
    return model


def save_checkpoint(model: nn.Module, spec: dict, path: str | Path, extra: dict | None = None) -> None:
    """A full-precision model as safetensors, with its spec in the metadata (written atomically)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"qdistill": "checkpoint", "spec": json.dumps(spec), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp, metadata=meta)
    tmp.replace(path)


def load_checkpoint(path: str | Path, spec: dict | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint written by `save_checkpoint`, or a plain state dict (safetensors or torch) given `spec`."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise QDistillError(f"model file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(path)
            if spec is None and "spec" in meta:
                spec = json.loads(meta["spec"])
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except QDistillError:
        raise
    except Exception as e:
        raise QDistillError(f"cannot read model file {path}: {e}") from e
    if spec is None:
        raise QDistillError(f"{path} does not say which model it holds: give the model (a preset or package.module:factory)")
    model = build_model(spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise QDistillError(f"weights in {path} do not fit model {spec['factory']}: {str(e).splitlines()[0]}") from e
    return model, spec


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ConvStudent",
    "PreActResNet",
    "STUDENT_PRESETS",
    "TEACHER_PRESETS",
    "build_model",
    "conv_student",
    "count_parameters",
    "load_checkpoint",
    "model_spec",
    "resnet_teacher",
    "save_checkpoint",
]

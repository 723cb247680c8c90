"""Model presets and user models, described by a small JSON-able spec so a saved file can rebuild its model.

A spec is {"factory": "package.module:function", "kwargs": {...}}; presets are names
("tiny", "small", "medium", "large" students; "resnet-small", "resnet" teachers; the language
models of LM_PRESETS, "lstm-*" and "gpt-*"); "hf:DIR" is a Hugging Face model's config (models/hf.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qdistill.errors import QDistillError
from qdistill.files import write_safetensors
from qdistill.models.convnet import STUDENT_PRESETS, ConvStudent, conv_student
from qdistill.models.hf import HF_FACTORY, Held, build_hf, check_build, check_hf_kwargs, hf_model, hf_spec, load_hf
from qdistill.models.lm import LSTM_PRESETS, TRANSFORMER_PRESETS, LSTMLanguageModel, lstm_lm, transformer_lm
from qdistill.models.resnet import TEACHER_PRESETS, PreActResNet, resnet_teacher
from qdistill.user_code import load_object

LM_PRESETS = (*LSTM_PRESETS, *TRANSFORMER_PRESETS)  # language models: their num_classes is the vocabulary size
LM_FACTORIES = ("qdistill.models:lstm_lm", "qdistill.models:transformer_lm")


def model_spec(name: str, in_channels: int = 1, num_classes: int = 10, hf_head: str | None = None, **kwargs) -> dict:
    """Turn a preset name, 'hf:DIR' (a Hugging Face model's config.json there, as `hf_head`) or
    'package.module:factory' into a spec; a language-model preset takes num_classes as its vocabulary
    size and has no use for in_channels (a Hugging Face model's sizes are its config's)."""
    if name.startswith("hf:"):
        return hf_spec(name.removeprefix("hf:"), hf_head)
    if name in STUDENT_PRESETS:
        return {"factory": "qdistill.models:conv_student", "kwargs": {"size": name, "in_channels": in_channels, "num_classes": num_classes}}
    if name in TEACHER_PRESETS:
        return {"factory": "qdistill.models:resnet_teacher", "kwargs": {"size": name, "in_channels": in_channels, "num_classes": num_classes}}
    if name in LSTM_PRESETS:
        return {"factory": "qdistill.models:lstm_lm", "kwargs": {"size": name, "vocab_size": num_classes}}
    if name in TRANSFORMER_PRESETS:
        return {"factory": "qdistill.models:transformer_lm", "kwargs": {"size": name, "vocab_size": num_classes}}
    if ":" in name:
        return {"factory": name, "kwargs": kwargs}
    presets = ", ".join([*STUDENT_PRESETS, *TEACHER_PRESETS, *LM_PRESETS])
    raise QDistillError(f"unknown model {name!r}: use a preset ({presets}), hf:DIR (a Hugging Face save_pretrained directory) or 'package.module:factory'")


def is_language_model(spec: dict) -> bool:
    """Whether a spec describes a language model: an LM preset, or a Hugging Face causal LM."""
    return spec.get("factory") in LM_FACTORIES or (spec.get("factory") == HF_FACTORY and spec.get("kwargs", {}).get("head") == "causal-lm")


def vocab_size_of(spec: dict) -> int | None:
    """A language model's vocabulary size as its spec states it (None: the preset's default)."""
    kwargs = spec.get("kwargs", {})
    return kwargs.get("config", {}).get("vocab_size") if spec.get("factory") == HF_FACTORY else kwargs.get("vocab_size")


def _preset_kwargs(presets: dict):
    """Checks a preset factory's keyword arguments, which come from files: a known size and bounded integers."""

    def check(kwargs: dict) -> dict:
        unknown = set(kwargs) - {"size", "in_channels", "num_classes"}
        if unknown:
            raise QDistillError(f"unknown preset arguments {sorted(unknown)}")
        size = kwargs.get("size", next(iter(presets)))
        if not isinstance(size, str) or size not in presets:
            raise QDistillError(f"unknown preset size {kwargs.get('size')!r}: one of {', '.join(presets)}")
        for key, top in (("in_channels", 1024), ("num_classes", 1 << 16)):
            v = kwargs.get(key, 1)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= top:
                raise QDistillError(f"preset argument {key} must be an integer from 1 to {top}, got {v!r}")
        return kwargs

    return check


def _lm_kwargs(presets: dict):
    """Checks a language-model preset's keyword arguments, which come from files: a known size, a bounded vocabulary."""

    def check(kwargs: dict) -> dict:
        unknown = set(kwargs) - {"size", "vocab_size"}
        if unknown:
            raise QDistillError(f"unknown preset arguments {sorted(unknown)}")
        if "size" in kwargs and (not isinstance(kwargs["size"], str) or kwargs["size"] not in presets):
            raise QDistillError(f"unknown preset size {kwargs['size']!r}: one of {', '.join(presets)}")
        v = kwargs.get("vocab_size")
        if "vocab_size" in kwargs and (not isinstance(v, int) or not 2 <= v <= 1 << 20):  # True and False fall below 2
            raise QDistillError(f"preset argument vocab_size must be an integer from 2 to {1 << 20}, got {v!r}")
        return kwargs

    return check


# The factories a spec read from a file may name: called by lookup, never imported by name.
PRESET_FACTORIES = {
    "qdistill.models:conv_student": (conv_student, _preset_kwargs(STUDENT_PRESETS)),
    "qdistill.models:resnet_teacher": (resnet_teacher, _preset_kwargs(TEACHER_PRESETS)),
    "qdistill.models:lstm_lm": (lstm_lm, _lm_kwargs(LSTM_PRESETS)),
    "qdistill.models:transformer_lm": (transformer_lm, _lm_kwargs(TRANSFORMER_PRESETS)),
    HF_FACTORY: (build_hf, check_hf_kwargs),  # hf_model's build: transformers' own classes, from the config as data
}


def build_model(spec: dict, trust_code: bool = True, source: str = "the spec", held: Held | None = None) -> nn.Module:
    """Build the model a spec describes.

    A preset is rebuilt from its data alone, once a build on the meta device has passed `check_build`:
    within what the file it came from `held` (its tensors), so a crafted spec allocates nothing. Any other
    factory is imported and called only with `trust_code`: callers pass False for specs read from a file
    (`source` names it), so opening a file never runs code it names."""
    if not isinstance(spec, dict) or not isinstance(spec.get("factory"), str) or not isinstance(spec.get("kwargs", {}), dict):
        raise QDistillError(f"{source} holds a malformed model spec (expected {{'factory': str, 'kwargs': dict}})")
    name, kwargs = spec["factory"], spec.get("kwargs", {})
    if name in PRESET_FACTORIES:
        factory, check = PRESET_FACTORIES[name]
        kwargs = check(kwargs)
        check_build(lambda: factory(**kwargs), held, source)
        return factory(**kwargs)
    if not trust_code:
        raise QDistillError(
            f"{source} names the model factory {name!r}, code outside qdistill, which is not run when a file is opened: "
            f"give the model yourself (--model {name}, or model=... in Python), or pass --trust-code (trust_code=True) "
            "if you trust whoever wrote the file"
        )
    factory = load_object(name, "model factory")
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise QDistillError(f"cannot build model {name} with {kwargs}: {e}") from e
    if not isinstance(model, nn.Module):
        raise QDistillError(f"model factory {name} returned {type(model).__name__}, not an nn.Module")
    return model


def save_checkpoint(model: nn.Module, spec: dict, path: str | Path, extra: dict | None = None) -> None:
    """A full-precision model as safetensors, with its spec in the metadata (written atomically).

    A tensor shared by several modules (tied embeddings) is stored once, under its first name:
    safetensors refuses shared tensors, and `load_state` gives the model's other names the same values."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"qdistill": "checkpoint", "spec": json.dumps(spec), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    write_safetensors({k: v.detach().contiguous().cpu() for k, v in _first_names(model).items()}, path, metadata=meta)


def _first_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once, under its first name (a tied tensor has several)."""
    seen, first = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            first[name] = t
    return first


def check_finite(t: torch.Tensor, name: str, path) -> None:
    """A float tensor of a model file holds no NaN or infinity: such a model would load and predict garbage."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise QDistillError(f"{path}: the tensor {name!r} holds NaN or infinite values (a damaged file, or a training run that diverged): it cannot be used")


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A state dict and its safetensors metadata, or one QDistillError naming the file (never torch's own advice).
    A NaN or infinite float is refused, naming its tensor: such a model would load and predict garbage."""
    try:
        meta = {}
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch.load's message suggests weights_only=False, i.e. unpickling the file: never pass that on
        raise QDistillError(
            f"cannot read model file {path}: it is truncated, damaged, or not a safetensors or PyTorch state-dict file ({type(e).__name__})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise QDistillError(f"{path} is not a state dict (a mapping of names to tensors)")
    for name, t in state.items():
        check_finite(t, name, path)
    return state, meta


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path, what: str) -> nn.Module:
    """`model.load_state_dict(state)`, as one QDistillError when the tensors do not fit.

    A tensor the model shares between modules may come under any one of its names (as
    `save_checkpoint` stores it): the model's other names for it get the same values."""
    names: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(name)
    state = dict(state)
    for tied in names.values():
        given = next((state[n] for n in tied if n in state), None)
        if given is not None:
            state.update({n: given for n in tied if n not in state})
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise QDistillError(f"weights in {path} do not fit {what}: {str(e).splitlines()[0]}") from None
    return model


def load_checkpoint(path: str | Path, spec: dict | None = None, model: nn.Module | None = None, trust_code: bool = False) -> tuple[nn.Module, dict]:
    """Load a checkpoint written by `save_checkpoint`, or a plain state dict (safetensors or torch).

    The architecture is `model`, else the caller's `spec`, else the file's own spec: a preset, or
    with `trust_code` a factory it names (never imported otherwise)."""
    path = Path(path)
    if not path.exists():
        raise QDistillError(f"model file {path} does not exist")
    state, meta = read_state(path)
    if model is None:
        if spec is None and "spec" in meta:
            try:
                spec = json.loads(meta["spec"])
            except (ValueError, RecursionError):
                raise QDistillError(f"{path} has a damaged model spec in its metadata") from None
            model = build_model(spec, trust_code=trust_code, source=str(path), held=Held(len(state), sum(t.numel() for t in state.values())))
        elif spec is None:
            raise QDistillError(f"{path} does not say which model it holds: give the model (a preset or package.module:factory)")
        else:
            model = build_model(spec)
    return load_state(model, state, path, f"model {spec['factory'] if spec else type(model).__name__}"), spec


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is a child in `model` (every parent that holds it)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)


__all__ = [
    "ConvStudent",
    "LM_PRESETS",
    "LSTMLanguageModel",
    "LSTM_PRESETS",
    "PreActResNet",
    "STUDENT_PRESETS",
    "TEACHER_PRESETS",
    "TRANSFORMER_PRESETS",
    "build_model",
    "conv_student",
    "count_parameters",
    "hf_model",
    "hf_spec",
    "is_language_model",
    "load_checkpoint",
    "load_hf",
    "lstm_lm",
    "model_spec",
    "read_state",
    "replace_module",
    "resnet_teacher",
    "save_checkpoint",
    "transformer_lm",
    "vocab_size_of",
]

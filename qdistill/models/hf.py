"""Hugging Face transformers models as qdistill models, described by data alone.

A spec {"factory": "qdistill.models:hf_model", "kwargs": {"head": "causal-lm" | "encoder", "config": {...}}}
holds the model's config as JSON. It is rebuilt with transformers' own classes for that model type
(`trust_remote_code=False` always), so a packed student reopens from its file without running code
the file names: a config asking for code (`auto_map`), for hub kernels or for a quantization library
is refused, and so is one whose sizes would allocate more than a model qdistill can train, or, for a spec
read from a file, more than the file's weights can fill (`check_build`).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from qdistill.errors import QDistillError
from qdistill.models.lm import quiet_optional_backends

HF_FACTORY = "qdistill.models:hf_model"
HEADS = ("causal-lm", "encoder")  # AutoModelForCausalLM, or AutoModel (the bare model: hidden states out)
MAX_CONFIG_BYTES = 16 << 20
MAX_PARAMETERS = 10**10  # parameters and buffers: 40 GB in float32, past a 7B teacher
# What a model built from a file's spec may take, as (times, plus) what the file holds. Values: twice its values, for
# buffers the config sizes and no file stores (causal masks, rotary tables: up to 0.3 times the weights in the 570
# transformers architectures, built with 2 layers). Modules, parameters and buffers registered: 8 per tensor (those
# architectures register 1.5 to 4.2). The pluses leave tiny models room.
HELD_VALUES = (2, 1 << 22)
HELD_REGISTRATIONS = (8, 1024)
# Bounds checked before transformers sees the config: some configs build lists as long as their layer count.
SIZE_LIMITS = {
    "vocab_size": 1 << 20,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "max_position_embeddings": 1 << 24,
    "num_local_experts": 4096,
    "num_experts": 4096,
    "n_routed_experts": 4096,
}
# Config keys that would make transformers run or fetch code, or hand the weights to another quantizer.
REFUSED_KEYS = {
    "auto_map": "names custom code (auto_map); qdistill builds only the architectures transformers ships",
    "quantization_config": "is already quantized by another library (quantization_config); give the full-precision model",
    **{key: "chooses a kernel, which may be one fetched from the hub" for key in ("attn_implementation", "_attn_implementation", "experts_implementation", "_experts_implementation")},
}


def _transformers():
    quiet_optional_backends()
    try:
        import transformers
    except ImportError:
        raise QDistillError("Hugging Face models need transformers: pip install transformers") from None
    return transformers


def _mappings(head: str) -> dict:
    """model_type -> class name, of the built-in models `head` can build."""
    from transformers.models.auto import modeling_auto

    return modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if head == "causal-lm" else modeling_auto.MODEL_MAPPING_NAMES


# The same sizes under the names other configs give them: a nested config without a model_type (its
# parent's class fills the type in) is checked under every name, since its class is not known yet.
OTHER_SIZE_NAMES = {
    **dict.fromkeys(("n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers"), 1024),
    **dict.fromkeys(("n_head", "num_heads", "encoder_attention_heads", "decoder_attention_heads"), 1024),
    **dict.fromkeys(("n_embd", "d_model", "hidden_dim"), 1 << 16),
    **dict.fromkeys(("d_ff", "ffn_dim", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim"), 1 << 18),
    **dict.fromkeys(("n_positions", "n_ctx"), 1 << 24),
}


def _sub_configs(config: dict, depth: int = 0):
    """The config and every dict nested in it (a multimodal model's text_config, typed or not, ...)."""
    if depth > 8:  # real models nest two or three deep
        raise QDistillError("the config nests sub-configs more than 8 deep: not a model's config")
    yield config
    for value in config.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                yield from _sub_configs(item, depth + 1)


def check_hf_kwargs(kwargs: dict) -> dict:
    """Checks the kwargs of `hf_model` as data, before transformers builds anything from them: a known head
    and model type, no key that asks for code, and bounded sizes. Raises QDistillError naming the fix."""
    if set(kwargs) - {"head", "config"}:
        raise QDistillError(f"unknown Hugging Face model arguments {sorted(set(kwargs) - {'head', 'config'})}: expected head and config")
    head, config = kwargs.get("head"), kwargs.get("config")
    if head not in HEADS:
        raise QDistillError(f"unknown Hugging Face head {head!r}: one of {', '.join(HEADS)}")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise QDistillError("a Hugging Face model spec needs its config as a dict with a model_type")
    transformers = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    subs = list(_sub_configs(config))
    for sub in subs:  # names only: nothing of the model type is imported before these pass
        model_type = sub.get("model_type", config["model_type"] if sub is not config else None)  # untyped: its parent's
        if "model_type" in sub and (not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES):
            raise QDistillError(
                f"model type {model_type!r} is not one transformers {transformers.__version__} knows: "
                "a newer transformers may know it; custom code from a model directory is never run"
            )
        for key, why in REFUSED_KEYS.items():
            if key in sub:
                raise QDistillError(f"the {model_type} config {why}: remove {key!r} from it")
    if config["model_type"] not in _mappings(head):
        other = "encoder" if head == "causal-lm" else "causal-lm"
        raise QDistillError(f"transformers has no {head} model for model type {config['model_type']!r} (--hf-head {other} builds the other kind)")
    for sub in subs:
        model_type = sub.get("model_type", config["model_type"])
        aliases = CONFIG_MAPPING[model_type].attribute_map if "model_type" in sub else {}  # GPT-2 says n_layer for num_hidden_layers
        limits = {aliases.get(name, name): limit for name, limit in SIZE_LIMITS.items()} | OTHER_SIZE_NAMES
        for key, limit in limits.items():
            value = sub.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit):
                raise QDistillError(f"the {model_type} config's {key} is {value!r}: qdistill builds models with {key} up to {limit:,}")
    return kwargs


def _config(config: dict):
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(config["model_type"], **fields)
    except Exception as e:  # a value of the wrong type, a failed validation
        raise QDistillError(f"cannot make a {config['model_type']} config from the spec: {_message(e)}") from None


def _auto_class(head: str):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if head == "causal-lm" else AutoModel


def _message(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class Held(NamedTuple):
    """What a file holds: how many tensors, and their values in all; a model built from its spec is filled from them."""

    tensors: int
    values: int


@contextmanager
def _counted(held: Held, source: str) -> Iterator[None]:
    """Counts the modules, parameters and buffers this thread registers (torch's global registration hooks, other
    threads' builds ignored), raising QDistillError past what `held` allows: a crafted layer count stops early."""
    times, plus = HELD_REGISTRATIONS
    limit, thread, count = times * held.tensors + plus, threading.get_ident(), 0

    def count_one(*_):
        nonlocal count
        if threading.get_ident() == thread:
            count += 1
            if count > limit:
                raise QDistillError(f"{source}: its spec registers more than {limit:,} modules, parameters and buffers but its weights hold {held.tensors:,} tensors: a damaged or crafted file (nothing was built)")

    hooks = [register(count_one) for register in (register_module_module_registration_hook, register_module_parameter_registration_hook, register_module_buffer_registration_hook)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def check_build(build: Callable[[], nn.Module], held: Held | None = None, source: str = "the spec") -> None:
    """Runs `build` on the meta device, which allocates nothing, and raises QDistillError unless its parameters
    and buffers stay within MAX_PARAMETERS values and, for a spec read from a file, within what the file `held`:
    a small file whose spec describes a huge model is refused before anything is built for real."""
    with _counted(held, source) if held is not None else nullcontext(), torch.device("meta"):
        model = build()
    values = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    if values > MAX_PARAMETERS:
        raise QDistillError(f"{source} describes {values:,} parameters and buffers, more than the {MAX_PARAMETERS:,} qdistill builds")
    times, plus = HELD_VALUES
    if held is not None and values > times * held.values + plus:
        raise QDistillError(f"{source}: its spec describes a model of {values:,} values but its weights hold {held.values:,}: a damaged or crafted file (nothing was built)")


def build_hf(head: str, config: dict) -> nn.Module:
    """The transformers model of kwargs `check_hf_kwargs` passed, with fresh weights in float32."""
    try:
        return _auto_class(head).from_config(_config(config), dtype=torch.float32)
    except QDistillError:
        raise
    except Exception as e:  # transformers' own refusal of an inconsistent config (heads not dividing the width, ...)
        raise QDistillError(f"transformers cannot build a {head} {config['model_type']} model from this config: {_message(e)}") from None


def checked_config(head: str, config: dict, held: Held | None = None, source: str | None = None):
    """The transformers config of checked kwargs, once `check_build` has passed its model (`held`: the file's)."""
    check_hf_kwargs({"head": head, "config": config})
    check_build(lambda: build_hf(head, config), held, source or f"the {config['model_type']} config")
    return _config(config)


def hf_model(head: str = "causal-lm", config: dict | None = None) -> nn.Module:
    """A transformers model with fresh weights, in float32, from its config as JSON (`checked_config`)."""
    return _auto_class(head).from_config(checked_config(head, config), dtype=torch.float32)


def _read_config(directory: Path) -> dict:
    if not directory.is_dir():
        raise QDistillError(f"hf:{directory}: no such directory (qdistill opens local save_pretrained directories only, never the hub)")
    path = directory / "config.json"
    if not path.is_file():
        raise QDistillError(f"hf:{directory}: no config.json there, so not a Hugging Face save_pretrained directory")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise QDistillError(f"{path} is over {MAX_CONFIG_BYTES >> 20} MB: not a model config")
    try:
        config = json.loads(path.read_text())
    except (ValueError, RecursionError):
        raise QDistillError(f"{path} is not valid JSON") from None
    if not isinstance(config, dict):
        raise QDistillError(f"{path} does not hold a config (a JSON object)")
    return config


def _infer_head(config: dict, source) -> str:
    """causal-lm when the config's architectures name a causal LM, else encoder; no architectures: ask."""
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise QDistillError(f"{source}: architectures must be a list of class names, got {architectures!r}")
    if not architectures:
        raise QDistillError(f"{source} names no architectures: say which model to build (--hf-head causal-lm or encoder; head= in Python)")
    return "causal-lm" if set(architectures) & set(_mappings("causal-lm").values()) else "encoder"


def hf_spec(source, head: str | None = None) -> dict:
    """The spec of a Hugging Face model: from a save_pretrained directory's config.json (its weights are
    `load_hf`'s business) or from a transformers config object (a student of your own size).

    `head` defaults to what the config's architectures say. The config is stored whole (as `to_dict`, in
    JSON), less the path it was read from, and checked as a file's spec would be."""
    transformers = _transformers()
    if isinstance(source, transformers.PretrainedConfig):
        config, where = json.loads(source.to_json_string(use_diff=False)), f"the {source.model_type} config"  # as JSON: label ids as text
    else:
        config, where = _read_config(Path(source)), f"hf:{source}"
    head = head or _infer_head(config, where)
    config = {k: v for k, v in config.items() if k != "_name_or_path"}  # a local path, of no use to the model
    config["dtype"] = "float32"  # what qdistill builds and trains
    return {"factory": HF_FACTORY, "kwargs": check_hf_kwargs({"head": head, "config": config})}


def _held(directory: Path) -> Held:
    """The tensors in a directory's safetensors files, from their headers (which safetensors checks against the data)."""
    tensors = values = 0
    try:
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                shapes = [f.get_slice(k).get_shape() for k in f.keys()]
            tensors, values = tensors + len(shapes), values + sum(math.prod(shape) for shape in shapes)
    except (OSError, SafetensorError) as e:
        raise QDistillError(f"cannot load the weights in hf:{directory}: {_message(e)}") from None
    if not tensors:
        raise QDistillError(f"cannot load the weights in hf:{directory}: no tensors in .safetensors files there (qdistill loads safetensors weights only)")
    return Held(tensors, values)


def load_hf(directory, head: str | None = None) -> tuple[nn.Module, dict]:
    """A save_pretrained directory's model with its own weights (safetensors only, local files only, no
    remote code), and its spec. Weights the directory lacks are refused: they would be random."""
    spec = hf_spec(directory, head)
    head = spec["kwargs"]["head"]
    config = checked_config(head, spec["kwargs"]["config"], _held(Path(directory)), f"hf:{directory}")  # as a file's spec
    try:
        model, info = _auto_class(head).from_pretrained(
            directory, config=config, dtype=torch.float32, local_files_only=True, trust_remote_code=False, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # no safetensors weights, damaged ones, or weights of other shapes
        raise QDistillError(f"cannot load the weights in hf:{directory}: {_message(e)}") from None
    if info["missing_keys"] or info["mismatched_keys"]:
        missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        raise QDistillError(f"the weights in hf:{directory} do not fill a {type(model).__name__} ({len(missing)} missing or misshapen, e.g. {missing[0]}): give the right --hf-head, or the model's own directory")
    return model.eval(), spec

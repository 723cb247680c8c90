"""Hugging Face transformers models as qdistill models, described by data alone.

A spec {"factory": "qdistill.models:hf_model", "kwargs": {"head": "causal-lm" | "encoder", "config": {...}}}
holds the model's config as JSON. It is rebuilt with transformers' own classes for that model type
(`trust_remote_code=False` always), so a packed student reopens from its file without running code
the file names: a config asking for code (`auto_map`), for hub kernels or for a quantization library
is refused, and so is one whose sizes would allocate more than a model qdistill can train.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from qdistill.errors import QDistillError
from qdistill.models.lm import quiet_optional_backends

HF_FACTORY = "qdistill.models:hf_model"
HEADS = ("causal-lm", "encoder")  # AutoModelForCausalLM, or AutoModel (the bare model: hidden states out)
MAX_CONFIG_BYTES = 16 << 20
MAX_PARAMETERS = 10**10  # parameters and buffers: 40 GB in float32, past a 7B teacher
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


def checked_config(head: str, config: dict):
    """The transformers config of checked kwargs, once a build on the meta device (which allocates
    nothing) has shown that its parameters and buffers stay within MAX_PARAMETERS values."""
    check_hf_kwargs({"head": head, "config": config})
    try:
        with torch.device("meta"):
            shell = _auto_class(head).from_config(_config(config), dtype=torch.float32)
    except QDistillError:
        raise
    except Exception as e:  # transformers' own refusal of an inconsistent config (heads not dividing the width, ...)
        raise QDistillError(f"transformers cannot build a {head} {config['model_type']} model from this config: {_message(e)}") from None
    values = sum(t.numel() for t in (*shell.parameters(), *shell.buffers()))
    if values > MAX_PARAMETERS:
        raise QDistillError(f"the {config['model_type']} config describes {values:,} parameters and buffers, more than the {MAX_PARAMETERS:,} qdistill builds")
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


def load_hf(directory, head: str | None = None) -> tuple[nn.Module, dict]:
    """A save_pretrained directory's model with its own weights (safetensors only, local files only, no
    remote code), and its spec. Weights the directory lacks are refused: they would be random."""
    spec = hf_spec(directory, head)
    head = spec["kwargs"]["head"]
    config = checked_config(head, spec["kwargs"]["config"])  # the checks a file's spec gets, sizes included
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

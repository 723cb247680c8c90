"""Export a packed LLaMA, Mistral or Qwen2 model (the gpt-* presets, an hf: student of those) to GGUF,
llama.cpp's format, with the `gguf` package.

GGUF's Q4_1 is blocks of 32 weights along a row, each w = d * q + m with a 4-bit q and float16 d and m:
exactly what a 4-bit (or 1- to 3-bit: same step, same minimum) min-max quantizer with row groups of 32
and float16 values stores (`--bits 4 --bucket 32 --groups row --scale-dtype float16`). Those weights
are written as Q4_1 from the file's own levels; every other tensor as float32 (the dense loader's
values). Names follow the gguf package's own map for the architecture; for LLaMA and Mistral the query
and key projections are permuted by rows as llama.cpp's converter does (its rotary layout), which moves
whole blocks. The tokenizer (a byte-level BPE tokenizer.json) is written when given, with its
end-of-text token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qdistill.data.model_tokenizer import end_token
from qdistill.errors import QDistillError
from qdistill.format.packed import entry_indices, entry_params, options, read_packed, row_group
from qdistill.runtime.load import load_packed

Q4_1_BLOCK = 32
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5  # llama.cpp's token types (gguf.TokenType)
# model_type -> (llama.cpp's architecture, whether its converter permutes the query and key rows): Mistral is
# written as LLaMA, as llama.cpp's converter does; Qwen2 keeps its rows (rotary halves, NEOX style) and q/k/v biases.
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}


def q4_1_ready(entry: dict) -> bool:
    """A 2-d uniform tensor of at most 4 bits stored as a minimum and a float16 step per row block of 32."""
    form = options(entry)
    return (entry["kind"] == "uniform" and len(entry["shape"]) == 2 and entry["index_bits"] <= 4 and row_group(entry) == Q4_1_BLOCK
            and form["zero_point"] == "float" and form["scale_dtype"] == "float16")


def q4_1_blocks(entry: dict, tensors: dict[str, torch.Tensor], rows: np.ndarray) -> np.ndarray:
    """The tensor's Q4_1 bytes [N, K // 32 * 20], its rows taken in the order `rows`."""
    n, k = entry["shape"]
    q = entry_indices(entry, tensors).view(n, k // Q4_1_BLOCK, Q4_1_BLOCK).to(torch.uint8).numpy()[rows]
    p = entry_params(entry, tensors)  # float16 values, held as float32: exact
    d = p["step"].numpy().astype(np.float16).reshape(n, -1, 1)[rows].view(np.uint8)
    m = p["lo"].numpy().astype(np.float16).reshape(n, -1, 1)[rows].view(np.uint8)
    qs = q[..., : Q4_1_BLOCK // 2] | (q[..., Q4_1_BLOCK // 2 :] << 4)
    return np.concatenate([d, m, qs], axis=-1).reshape(n, -1)


def permuted_heads(name: str, config: dict) -> int | None:
    """The heads whose rows llama.cpp's LLaMA converter permutes in a query or key projection (its weight or bias); None for other tensors."""
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return config["num_attention_heads"]
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def rope_rows(n_rows: int, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter gives a query or key projection (`LlamaModel.permute`)."""
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def export_gguf(path: str | Path, out: str | Path, tokenizer_json: str | Path | None = None) -> dict:
    """Write the packed LLaMA, Mistral or Qwen2 model at `path` as GGUF at `out`; returns how many tensors are Q4_1 and float32."""
    try:
        import gguf
    except ImportError:
        raise QDistillError("the gguf package is not installed: pip install 'qdistill[export]'") from None

    meta, tensors = read_packed(path)
    model = load_packed(path)[0]
    config = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else {}
    if config.get("model_type") not in ARCHITECTURES:
        raise QDistillError(f"{path} is not a LLaMA, Mistral or Qwen2 language model (a gpt-* preset, or an hf: student of those): GGUF export takes those")
    arch, permuted = ARCHITECTURES[config["model_type"]]
    tokenizer = read_tokenizer(Path(tokenizer_json), config["vocab_size"]) if tokenizer_json is not None else None  # refused before anything is written
    eos = end_token(Path(tokenizer_json).parent) if tokenizer_json is not None else None  # its tokenizer_config.json's, if any
    dense = model.state_dict()
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], n_layers)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // n_head)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    if tokenizer is not None:
        add_tokenizer(writer, *tokenizer, tokenizer[0].index(eos) if eos in tokenizer[0] else None)
    quantized = {e["name"]: e for e in meta["quantized"]}
    counts = {"q4_1": 0, "float32": 0}
    for name, value in dense.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reads the output layer from the embedding when the file has none
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise QDistillError(f"{path}: no GGUF name for {name} (a {config['model_type']} model with extra tensors?)")
        heads = permuted_heads(name, config) if permuted else None
        rows = rope_rows(value.shape[0], heads) if heads else np.arange(value.shape[0])
        entry = quantized.get(name)
        if entry is not None and q4_1_ready(entry):
            writer.add_tensor(gguf_name, q4_1_blocks(entry, tensors, rows), raw_dtype=gguf.GGMLQuantizationType.Q4_1)  # shape: from the bytes
            counts["q4_1"] += 1
        else:
            writer.add_tensor(gguf_name, value.float().numpy()[rows])
            counts["float32"] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def quoted(value) -> str:
    """A value from a file, quoted (escape sequences and newlines escaped) and cut short, for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_tokenizer(tokenizer_json: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE tokenizer.json's tokens by id, their types and its merges, as llama.cpp's "gpt2" tokenizer
    takes them. The file may come from anyone: its ids must be the model's, 0 to vocab_size - 1, each once (llama.cpp
    reads a token's id from its place in the list, so a repeat would shift every token after it). Ids the tokenizer
    leaves out (a model's vocabulary padded past its tokenizer's) are "[PAD<id>]" tokens of type unused, as
    llama.cpp's own converter writes them; added tokens marked special are control tokens."""
    what = f"{tokenizer_json} is not a byte-level BPE tokenizer.json (model.vocab, a mapping of tokens to ids, and model.merges, a list)"
    try:
        data = json.loads(tokenizer_json.read_text())
        vocab, merges, added = data["model"]["vocab"], data["model"]["merges"], data.get("added_tokens") or []
    except (OSError, ValueError, KeyError, TypeError, RecursionError, AttributeError):
        raise QDistillError(what) from None
    if not isinstance(vocab, dict) or not isinstance(merges, list) or not isinstance(added, list):
        raise QDistillError(what)
    fix = "give the model's own tokenizer"
    by_id, special = {}, set()
    entries = list(vocab.items()) + [(a.get("content"), a.get("id")) for a in added if isinstance(a, dict)]
    for n, (token, i) in enumerate(entries):
        if not isinstance(token, str) or type(i) is not int:  # json's true, 1.0 and "1" are not ids
            raise QDistillError(f"{tokenizer_json}: the token {quoted(token)} has the id {quoted(i)}, not an integer; {fix}")
        if not 0 <= i < vocab_size:
            raise QDistillError(f"{tokenizer_json}: the token {quoted(token)} has the id {quoted(i)}, outside the model's vocabulary [0, {vocab_size}); {fix}")
        if by_id.get(i, token) != token:  # (an added token is listed in model.vocab too, under its own id)
            raise QDistillError(f"{tokenizer_json}: the tokens {quoted(by_id[i])} and {quoted(token)} both have the id {i}; {fix}")
        by_id[i] = token
        if n >= len(vocab) and added[n - len(vocab)].get("special") is True:
            special.add(i)
    if not merges:
        raise QDistillError(f"{tokenizer_json} has no merges, and llama.cpp refuses a gpt2 tokenizer without them: give the model's own byte-level BPE tokenizer")
    for m in merges:
        if not (isinstance(m, str) or isinstance(m, list) and len(m) == 2 and all(isinstance(part, str) for part in m)):
            raise QDistillError(f"{tokenizer_json}: the merge {quoted(m)} is neither \"a b\" nor [\"a\", \"b\"]; {fix}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [TOKEN_UNUSED if i not in by_id else TOKEN_CONTROL if i in special else TOKEN_NORMAL for i in range(vocab_size)]
    return tokens, types, [m if isinstance(m, str) else " ".join(m) for m in merges]


def add_tokenizer(writer, tokens: list[str], types: list[int], merges: list[str], eos_id: int | None = None) -> None:
    """`read_tokenizer`'s tokens, types and merges as llama.cpp's "gpt2" tokenizer, with the end-of-text token's id."""
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if eos_id is not None:
        writer.add_eos_token_id(eos_id)


def read_gguf_weights(out: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, dequantized by the gguf package: what a reader of the file sees."""
    import gguf

    reader = gguf.GGUFReader(str(out))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}


def gguf_difference(out: str | Path, path: str | Path) -> float:
    """The largest difference between a weight as the gguf package reads it from `out` and as the packed
    file at `path` loads (its rows put back in the model's order)."""
    import gguf

    model = load_packed(path)[0]
    config = model.config.to_dict()
    arch, permuted = ARCHITECTURES[config["model_type"]]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], config["num_hidden_layers"])
    read = read_gguf_weights(out)
    worst = 0.0
    for name, value in model.state_dict().items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name not in read:
            continue  # the tied output layer
        heads = permuted_heads(name, config) if permuted else None
        got = read[gguf_name][np.argsort(rope_rows(value.shape[0], heads))] if heads else read[gguf_name]
        worst = max(worst, float(np.abs(got - value.float().numpy()).max()))
    return worst

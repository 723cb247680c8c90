"""Export to GGUF: a LLaMA student's Q4_1-shaped weights (4 bits, row blocks of 32, float16 step and minimum)
are written as Q4_1 from the file's levels, and the gguf package reads every weight back exactly."""

import json

import pytest
import torch

import qdistill
from qdistill.cli import main
from qdistill.errors import QDistillError
from qdistill.export.gguf import export_gguf, gguf_difference, rope_rows
from qdistill.models import build_model, model_spec
from qdistill.quant import attach


def packed_llama(tmp_path, bits=4, **options):
    torch.manual_seed(0)
    spec = model_spec("gpt-tiny", num_classes=64)
    model = build_model(spec)
    attach(model, qdistill.UniformQuantizer(bits=bits, **options))
    return qdistill.save_packed(model, spec, tmp_path / "m.safetensors")


@pytest.mark.parametrize("bits", [2, 4])
def test_q4_1_weights_read_back_exactly(tmp_path, bits):
    path = packed_llama(tmp_path, bits, bucket=32, groups="row", scale_dtype="float16")
    counts = export_gguf(path, tmp_path / "m.gguf")
    # Q4_1: the embedding (the tied head, read by llama.cpp from it) and 12 of the 14 decoder Linear weights; float32:
    # the 2 down projections (344 inputs: no whole blocks of 32) and the 5 RMSNorm weights
    assert counts == {"q4_1": 13, "float32": 7}
    assert gguf_difference(tmp_path / "m.gguf", path) == 0.0
    assert (tmp_path / "m.gguf").stat().st_size < (tmp_path / "m.safetensors").stat().st_size * 4


def test_other_forms_stay_float32_and_still_read_back(tmp_path):
    path = packed_llama(tmp_path, 4, bucket=32, groups="row")  # float32 minimum and maximum: not Q4_1's float16 d and m
    assert export_gguf(path, tmp_path / "m.gguf")["q4_1"] == 0
    assert gguf_difference(tmp_path / "m.gguf", path) == 0.0


def test_rope_rows_interleave_each_heads_halves():
    """llama.cpp's converter permutes query and key rows: per head, row i of the first half, then row i of the second."""
    assert rope_rows(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_refuses_a_model_llama_cpp_does_not_map(tmp_path):
    torch.manual_seed(0)
    spec = model_spec("lstm-tiny", num_classes=64)
    model = build_model(spec)
    attach(model, qdistill.UniformQuantizer(bits=4))
    path = qdistill.save_packed(model, spec, tmp_path / "l.safetensors")
    with pytest.raises(QDistillError, match="not a LLaMA, Mistral or Qwen2 language model"):
        export_gguf(path, tmp_path / "l.gguf")


def test_command_line_gguf_export(tmp_path, capsys):
    path = packed_llama(tmp_path, 4, bucket=32, groups="row", scale_dtype="float16")
    vocab = {f"t{i}": i for i in range(64)}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": ["t 1"]}}))
    out = tmp_path / "m.gguf"
    assert main(["export", str(path), str(out), "--format", "gguf", "--tokenizer", str(tmp_path)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "13 tensors as Q4_1" in said and "within 0.0e+00" in said
    import gguf

    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2" and len(reader.fields["tokenizer.ggml.tokens"].contents()) == 64
    before = out.read_bytes()
    assert main(["export", str(path), str(out), "--format", "gguf"]) == 2 and "exists" in capsys.readouterr().err and out.read_bytes() == before


def test_a_tokenizer_without_merges_is_refused(tmp_path, capsys):
    """llama.cpp will not load a gpt2 tokenizer without merges (seen with bench/llama_cpp.py): say so at export."""
    path = packed_llama(tmp_path, 4, bucket=32, groups="row", scale_dtype="float16")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(64)}, "merges": []}}))
    assert main(["export", str(path), str(tmp_path / "m.gguf"), "--format", "gguf", "--tokenizer", str(tmp_path / "tokenizer.json")]) == 2
    assert "has no merges" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()


GOOD_VOCAB = {f"t{i}": i for i in range(64)}
BAD_TOKENIZERS = [  # (model.vocab, model.merges, what the error says)
    ([f"t{i}" for i in range(64)], ["t 1"], "model.vocab, a mapping of tokens to ids"),
    (GOOD_VOCAB, "t 1", "model.merges, a list"),
    ({f"t{i}": i + 1 for i in range(64)}, ["t 1"], "the token 't63' has the id 64, outside the model's vocabulary [0, 64)"),
    ({**GOOD_VOCAB, "t0": -1}, ["t 1"], "the token 't0' has the id -1, outside the model's vocabulary [0, 64)"),
    ({**GOOD_VOCAB, "t1": 0}, ["t 1"], "the tokens 't0' and 't1' both have the id 0"),
    ({**GOOD_VOCAB, "t3": "3"}, ["t 1"], "the token 't3' has the id '3', not an integer"),
    ({**GOOD_VOCAB, "t3": 3.0}, ["t 1"], "the token 't3' has the id 3.0, not an integer"),
    ({**GOOD_VOCAB, "t1": True}, ["t 1"], "the token 't1' has the id True, not an integer"),
    ({**GOOD_VOCAB, "\x1b[2Jt": 10**30}, ["t 1"], r"the token '\x1b[2Jt' has the id 1000000000000000000000000000000, outside"),
    (GOOD_VOCAB, [["t", 1]], "the merge ['t', 1] is neither"),
]


@pytest.fixture(scope="module")
def q4_1_llama(tmp_path_factory):
    return packed_llama(tmp_path_factory.mktemp("llama"), 4, bucket=32, groups="row", scale_dtype="float16")


@pytest.mark.parametrize("vocab, merges, message", BAD_TOKENIZERS)
def test_a_tokenizer_whose_ids_are_not_the_models_is_refused_before_anything_is_written(q4_1_llama, tmp_path, capsys, vocab, merges, message):
    """llama.cpp takes a token's id from its place in the list: a gap, a repeat or a stray id would shift the tokens."""
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": merges}}))
    assert main(["export", str(q4_1_llama), str(tmp_path / "m.gguf"), "--format", "gguf", "--tokenizer", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdistill: error: ") and err.count("\n") == 1 and message in err, err
    assert "\x1b" not in err and [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    with pytest.raises(QDistillError, match="tokenizer.json"):
        export_gguf(q4_1_llama, tmp_path / "direct.gguf", tmp_path / "tokenizer.json")
    assert not (tmp_path / "direct.gguf").exists()


def test_ids_the_tokenizer_lacks_are_padded_and_its_end_token_is_named(q4_1_llama, tmp_path):
    """A model's vocabulary padded past its tokenizer's (Qwen2's 151,936 rows for 151,646 tokens), as llama.cpp's converter writes it."""
    import gguf

    vocab = {k: v for k, v in GOOD_VOCAB.items() if v not in (5, 63)}
    added = [{"id": 63, "content": "<|end|>", "special": True}]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": ["t 1"]}, "added_tokens": added}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    export_gguf(q4_1_llama, tmp_path / "m.gguf", tmp_path / "tokenizer.json")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in reader.fields["tokenizer.ggml.token_type"].data]
    assert tokens[4:7] == ["t4", "[PAD5]", "t6"] and tokens[63] == "<|end|>" and len(tokens) == 64
    assert types[5] == gguf.TokenType.UNUSED and types[63] == gguf.TokenType.CONTROL and types[4] == gguf.TokenType.NORMAL
    assert int(reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == 63

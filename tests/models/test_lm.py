"""Language-model presets: shapes, the tied embedding, quantization, and files that rebuild them from data alone."""

import copy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qdistill import QDistillError, UniformQuantizer, attach, detach, load_packed, quantized_tensors, save_packed
from qdistill.models import LM_PRESETS, LSTMLanguageModel, build_model, load_checkpoint, model_spec, save_checkpoint
from tests.export.test_untrusted import rewrite

VOCAB = 97
FAMILIES = ["lstm-tiny", "gpt-tiny"]
TIED = {"lstm-tiny": ("embedding.weight", "head.weight"), "gpt-tiny": ("model.embed_tokens.weight", "lm_head.weight")}


def lm(preset):
    if preset.startswith("gpt"):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    return build_model(model_spec(preset, num_classes=VOCAB))


def logits(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def tokens(batch=3, length=11):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def tied_pair(model, preset):
    """The embedding and the output layer."""
    return tuple(model.get_submodule(name.rsplit(".", 1)[0]) for name in TIED[preset])


@pytest.mark.parametrize("preset", FAMILIES)
def test_logits_shape_and_head_is_the_embedding(preset):
    model = lm(preset)
    assert logits(model, tokens(2, 7)).shape == (2, 7, VOCAB)
    emb, head = tied_pair(model, preset)
    assert head.weight is emb.weight


def test_lstm_projects_back_to_the_embedding_size_when_hidden_differs():
    model = LSTMLanguageModel(VOCAB, dim=16, hidden=24, num_layers=2, dropout=0.1)
    assert isinstance(model.proj, nn.Linear) and model.head.weight is model.embedding.weight
    assert model(tokens(2, 5)).shape == (2, 5, VOCAB)


def test_presets_and_specs():
    assert set(LM_PRESETS) == {"lstm-teacher", "lstm-small", "lstm-tiny", "gpt-teacher", "gpt-small", "gpt-tiny"}
    assert model_spec("lstm-small", in_channels=3, num_classes=500) == {"factory": "qdistill.models:lstm_lm", "kwargs": {"size": "lstm-small", "vocab_size": 500}}
    assert model_spec("gpt-tiny", num_classes=500) == {"factory": "qdistill.models:transformer_lm", "kwargs": {"size": "gpt-tiny", "vocab_size": 500}}
    with pytest.raises(QDistillError, match="tiny.*resnet.*lstm-teacher.*gpt-tiny"):
        model_spec("gpt-huge")


_opened: list | None = None  # what is opened while a test watches: an audit hook sees os.open too, not only open()


def _audit(event, args):
    if event == "open" and _opened is not None:
        _opened.append(args[0])


sys.addaudithook(_audit)  # for the session: hooks cannot be removed, and this one is idle unless a test watches


def test_transformer_is_built_without_network_or_hugging_face_cache(monkeypatch):
    global _opened
    pytest.importorskip("transformers")
    from huggingface_hub import constants

    def no_network(*args):
        raise AssertionError("building a preset opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    _opened = []
    try:
        model = lm("gpt-tiny")
    finally:
        opened, _opened = _opened, None
    cache = Path(constants.HF_HOME).resolve()
    assert not [p for p in opened if isinstance(p, (str, Path)) and Path(p).resolve().is_relative_to(cache)]
    assert model.config._attn_implementation in ("sdpa", "eager")


def test_building_a_transformer_prints_nothing():
    """transformers imports torchao where installed; its warnings about CUDA libraries must not reach users."""
    pytest.importorskip("torchao")
    code = "from qdistill.models import build_model, model_spec; build_model(model_spec('gpt-tiny', num_classes=11))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""


@pytest.mark.parametrize("preset", FAMILIES)
def test_attach_quantizes_every_weight_and_the_tied_one_once(preset):
    model = lm(preset)
    expected = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            expected.append(f"{name}.weight")
        elif isinstance(module, nn.LSTM):
            expected += [f"{name}.{p}" for p, _ in module.named_parameters() if p.startswith("weight_")]
    emb_name, head_name = TIED[preset]
    expected.remove(head_name)  # the embedding's other name

    qts = attach(model, UniformQuantizer(4, 64))
    assert sorted(qt.name for qt in quantized_tensors(model)) == sorted(expected)
    tied = [qt for qt in qts if qt.tied]
    assert [(qt.name, [use[0] for use in qt.tied]) for qt in tied] == [(emb_name, [head_name])]
    emb, head = tied_pair(model, preset)
    assert head.parametrizations.weight.original is emb.parametrizations.weight.original  # one shadow
    assert head.parametrizations.weight[0] is emb.parametrizations.weight[0]  # one quantizer
    assert len(torch.unique(emb.weight.reshape(-1)[:64])) <= 16 and torch.equal(head.weight, emb.weight)

    model.eval()
    ids = tokens()
    plain = detach(copy.deepcopy(model))  # weights become Q(w), still tied
    assert tied_pair(plain, preset)[1].weight is tied_pair(plain, preset)[0].weight
    with torch.no_grad():
        assert torch.equal(logits(model, ids), logits(plain, ids))  # every layer, the head included, computes with Q(w)


@pytest.fixture(scope="module")
def packed_lm(tmp_path_factory):
    """(preset, bits) -> the quantized model in eval mode and its packed file, each made once."""
    folder, made = tmp_path_factory.mktemp("lm"), {}

    def make(preset, bits):
        if (preset, bits) not in made:
            model = lm(preset)
            attach(model, UniformQuantizer(bits, 64))
            model.eval()
            made[preset, bits] = model, save_packed(model, model_spec(preset, num_classes=VOCAB), folder / f"{preset}-{bits}.safetensors")
        return made[preset, bits]

    return make


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("preset", FAMILIES)
def test_packed_file_rebuilds_the_preset_and_predicts_identically(packed_lm, preset, bits):
    model, path = packed_lm(preset, bits)
    loaded, meta = load_packed(path)  # no model given: rebuilt from the file's spec
    emb, head = tied_pair(loaded, preset)
    assert head.weight is emb.weight and meta["aliases"] == {TIED[preset][1]: TIED[preset][0]}
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(logits(loaded, ids), logits(model, ids))
    fp32 = 4 * sum(p.numel() for p in loaded.parameters())
    if bits == 2:
        assert path.stat().st_size < 0.3 * fp32


@pytest.mark.parametrize("preset", FAMILIES)
def test_checkpoint_stores_the_tied_tensor_once_and_loads_tied(tmp_path, preset):
    model = lm(preset).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, model_spec(preset, num_classes=VOCAB), path)
    with safe_open(str(path), "pt") as f:
        assert TIED[preset][0] in f.keys() and TIED[preset][1] not in f.keys()
    loaded = load_checkpoint(path)[0].eval()
    emb, head = tied_pair(loaded, preset)
    assert head.weight is emb.weight
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(logits(loaded, ids), logits(model, ids))


BAD_KWARGS = [
    ("unknown size", {"size": "huge"}),
    ("the other family's size", {"size": "gpt-tiny"}),
    ("size not a string", {"size": ["lstm-tiny"]}),
    ("huge vocabulary", {"vocab_size": 10**9}),
    ("one token", {"vocab_size": 1}),
    ("vocabulary a bool", {"vocab_size": True}),
    ("vocabulary a float", {"vocab_size": 97.0}),
    ("extra argument", {"dropout": 0.5}),
]


@pytest.mark.parametrize("edit", [e for _, e in BAD_KWARGS], ids=[n for n, _ in BAD_KWARGS])
def test_lm_preset_with_bad_arguments_is_refused(packed_lm, tmp_path, edit):
    _, packed = packed_lm("lstm-tiny", 2)
    path = rewrite(packed, tmp_path / "x.safetensors", lambda m: m["spec"]["kwargs"].update(edit))
    with pytest.raises(QDistillError, match="unknown preset|preset argument"):
        load_packed(path)
    spec = model_spec("lstm-tiny", num_classes=VOCAB)
    spec["kwargs"].update(edit)
    save_checkpoint(nn.Linear(2, 2), spec, tmp_path / "c.safetensors")
    with pytest.raises(QDistillError, match="unknown preset|preset argument"):
        load_checkpoint(tmp_path / "c.safetensors")


def test_transformer_preset_with_bad_arguments_is_refused():
    for edit in ({"size": "lstm-tiny"}, {"vocab_size": 10**9}, {"max_position_embeddings": 8}):
        with pytest.raises(QDistillError, match="unknown preset|preset argument"):
            build_model({"factory": "qdistill.models:transformer_lm", "kwargs": {"size": "gpt-tiny", "vocab_size": VOCAB, **edit}}, trust_code=False)

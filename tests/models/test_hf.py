"""Hugging Face models in and out: specs as data, quantization defaults, packed files reopened from the
file alone, crafted specs refused, export to save_pretrained, and the command line. Offline, tiny models."""

import copy
import json
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig, T5Config  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from qdistill import QDistillError, UniformQuantizer, attach, detach, load_packed, quantized_tensors, save_packed  # noqa: E402
from qdistill.cli import main  # noqa: E402
from qdistill.export import export_hf, save_pretrained_dir  # noqa: E402
from qdistill.models import build_model, hf_spec, load_hf, model_spec  # noqa: E402
from qdistill.models.hf import MAX_PARAMETERS, Held, check_build  # noqa: E402
from qdistill.train import TrainConfig  # noqa: E402
from tests.export.test_untrusted import OUTGROWN, deadline, nothing_built_for_real, rewrite  # noqa: E402
from tests.test_cli import text_folder  # noqa: E402

VOCAB = 97
KINDS = ["llama", "gpt2", "bert"]
HEAD = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "encoder"}
TIED = {"llama": ("model.embed_tokens.weight", "lm_head.weight"), "gpt2": ("transformer.wte.weight", "lm_head.weight")}


def tiny_config(kind, vocab=VOCAB):
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=None, eos_token_id=None)
    return BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)


def auto(kind):
    return AutoModelForCausalLM if HEAD[kind] == "causal-lm" else AutoModel


def outputs(model, ids):
    """Logits of a causal LM, hidden states of an encoder."""
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tokens(batch=3, length=11):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """kind -> (a save_pretrained directory, the model written there)."""
    folder, made = tmp_path_factory.mktemp("hf"), {}

    def make(kind):
        if kind not in made:
            torch.manual_seed(0)
            model = auto(kind).from_config(tiny_config(kind)).eval()
            model.save_pretrained(folder / kind)
            made[kind] = folder / kind, model
        return made[kind]

    return make


@pytest.mark.parametrize("kind", KINDS)
def test_spec_is_json_and_rebuilds_the_architecture(kind):
    spec = hf_spec(tiny_config(kind), HEAD[kind])
    assert spec["factory"] == "qdistill.models:hf_model" and json.loads(json.dumps(spec)) == spec
    model = build_model(json.loads(json.dumps(spec)), trust_code=False)  # as from a file: data alone
    reference = auto(kind).from_config(tiny_config(kind))
    assert type(model) is type(reference)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert hf_spec(model.config, HEAD[kind]) == spec  # the rebuilt model describes itself the same way


@pytest.mark.parametrize("kind", KINDS)
def test_a_save_pretrained_directory_gives_its_spec_and_weights(pretrained, kind):
    directory, original = pretrained(kind)
    spec = hf_spec(directory)  # the head from the config's architectures
    assert spec["kwargs"]["head"] == HEAD[kind] and "_name_or_path" not in spec["kwargs"]["config"]
    assert model_spec(f"hf:{directory}", num_classes=VOCAB) == spec
    model, loaded_spec = load_hf(directory)
    assert loaded_spec == spec
    assert torch.equal(outputs(model, tokens()), outputs(original, tokens()))


def test_a_config_alone_makes_a_fresh_student_and_names_its_head(tmp_path):
    tiny_config("gpt2").save_pretrained(tmp_path)  # config.json only, no architectures
    with pytest.raises(QDistillError, match="names no architectures.*--hf-head"):
        hf_spec(tmp_path)
    spec = hf_spec(tmp_path, "causal-lm")
    assert type(build_model(spec, trust_code=False)).__name__ == "GPT2LMHeadModel"
    with pytest.raises(QDistillError, match="cannot load the weights"):
        load_hf(tmp_path, "causal-lm")  # no weights to load


def test_weights_that_do_not_fill_the_model_are_refused(pretrained):
    directory, _ = pretrained("bert")  # a bare BertModel's weights: a causal LM's head would be random
    with pytest.raises(QDistillError, match="do not fill a BertLMHeadModel.*missing"):
        load_hf(directory, "causal-lm")


def quantizable(model):
    """Every weight of a Linear, Conv1D or Embedding, by name."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D, nn.Embedding))}


@pytest.mark.parametrize("kind", KINDS)
def test_every_linear_and_conv1d_weight_is_quantized_and_a_tied_head_once(kind):
    model = build_model(hf_spec(tiny_config(kind), HEAD[kind])).eval()
    expected = quantizable(model) - ({TIED[kind][1]} if kind in TIED else set())
    if kind == "gpt2":
        assert any(isinstance(m, Conv1D) for m in model.modules()) and "transformer.h.0.attn.c_attn.weight" in expected
    qts = attach(model, UniformQuantizer(4, 64))
    assert sorted(qt.name for qt in qts) == sorted(expected)
    assert [(qt.name, [use[0] for use in qt.tied]) for qt in qts if qt.tied] == ([(TIED[kind][0], [TIED[kind][1]])] if kind in TIED else [])
    plain = detach(copy.deepcopy(model))  # weights become Q(w)
    assert torch.equal(outputs(model, tokens()), outputs(plain, tokens()))  # every quantized layer computes with Q(w)
    if kind == "gpt2":  # a Conv1D ([in, out]) holds 16 levels per bucket of 64 consecutive values
        assert len(torch.unique(plain.transformer.h[0].attn.c_attn.weight.reshape(-1)[:64])) <= 16


@pytest.mark.parametrize(
    "kind, exclude, kept",
    [
        ("gpt2", ["transformer.wpe.weight"], {"transformer.wpe.weight"}),
        ("gpt2", ["lm_head.weight"], {"transformer.wte.weight", "lm_head.weight"}),  # the head is the embedding: both stay
        ("llama", ["*embed_tokens*"], {"model.embed_tokens.weight", "lm_head.weight"}),
        ("bert", ["*embeddings*"], {f"embeddings.{e}.weight" for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")}),
    ],
)
def test_embeddings_and_head_are_chosen_by_pattern(kind, exclude, kept):
    model = build_model(hf_spec(tiny_config(kind), HEAD[kind]))
    attach(model, UniformQuantizer(4, 64), **TrainConfig(exclude=exclude).select_kwargs())  # --exclude GLOB
    qts = quantized_tensors(model)
    assert quantizable(model) - {qt.name for qt in qts} - {use[0] for qt in qts for use in qt.tied} == kept


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """kind -> (the 4-bit quantized model in eval mode, its packed file)."""
    folder, made = tmp_path_factory.mktemp("packed"), {}

    def make(kind):
        if kind not in made:
            torch.manual_seed(0)
            spec = hf_spec(tiny_config(kind), HEAD[kind])
            model = build_model(spec)
            attach(model, UniformQuantizer(4, 64))
            made[kind] = model.eval(), save_packed(model, spec, folder / f"{kind}.safetensors")
        return made[kind]

    return make


@pytest.mark.parametrize("kind", KINDS)
def test_packed_file_reloads_bit_exact_from_the_file_alone(packed, kind):
    model, path = packed(kind)
    loaded, meta = load_packed(path)  # no model given: rebuilt from the file's spec, no code named in it run
    assert type(loaded) is type(model) and meta["spec"]["factory"] == "qdistill.models:hf_model"
    baked = detach(copy.deepcopy(model)).state_dict()
    assert loaded.state_dict().keys() == baked.keys()
    assert all(torch.equal(loaded.state_dict()[k], baked[k]) for k in baked)
    if kind in TIED:
        emb, head = (loaded.get_submodule(n.rsplit(".", 1)[0]) for n in TIED[kind])
        assert head.weight is emb.weight
    assert torch.equal(outputs(loaded, tokens()), outputs(model, tokens()))


EVIL = "qdistill_evil_module"


def nested(config: dict, depth: int) -> dict:
    for _ in range(depth):
        config = {"model_type": "llama", "text_config": config}
    return config


def crafted(marker: Path):
    """(name, edit of a llama spec's kwargs, the refusal's message)."""
    huge = {"hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1, "num_attention_heads": 64, "num_key_value_heads": 64, "head_dim": 1024}
    return [
        ("unknown model type", lambda k: k["config"].update(model_type=EVIL), "not one transformers"),
        ("auto_map", lambda k: k["config"].update(auto_map={"AutoModelForCausalLM": f"{EVIL}.Model", "AutoConfig": f"{EVIL}.Config"}), "custom code"),
        ("auto_map in a sub-config", lambda k: k["config"].update(text_config={**k["config"], "auto_map": {"AutoConfig": f"{EVIL}.Config"}}), "custom code"),
        ("sub-configs nested a hundred deep", lambda k: k["config"].update(text_config=nested(dict(k["config"]), 100)), "more than 8 deep"),
        ("hub kernel", lambda k: k["config"].update(attn_implementation="kernels-community/flash-attn"), "kernel"),
        ("quantization library", lambda k: k["config"].update(quantization_config={"quant_method": "bitsandbytes"}), "quantization_config"),
        ("huge vocabulary", lambda k: k["config"].update(vocab_size=10**9), "vocab_size"),
        ("a million layers", lambda k: k["config"].update(num_hidden_layers=10**6), "num_hidden_layers"),
        ("a layer count as text", lambda k: k["config"].update(num_hidden_layers="2"), "num_hidden_layers"),
        ("a million layers in an untyped sub-config", lambda k: k["config"].update(text_config={"num_hidden_layers": 10**6}), "num_hidden_layers"),
        ("a million layers under another name", lambda k: k["config"].update(text_config={"n_layer": 10**6}), "n_layer"),
        ("auto_map in an untyped sub-config", lambda k: k["config"].update(text_config={"auto_map": {"AutoConfig": f"{EVIL}.Config"}}), "custom code"),
        ("sizes each allowed, too large together", lambda k: k["config"].update(huge), f"more than the {MAX_PARAMETERS:,}"),
        ("unknown head", lambda k: k.update(head="seq2seq"), "unknown Hugging Face head"),
        ("no causal LM of that type", lambda k: k["config"].update(model_type="t5"), "no causal-lm model"),
        ("extra argument", lambda k: k.update(trust_remote_code=True), "unknown Hugging Face model arguments"),
    ]


@pytest.mark.parametrize("case", range(len(crafted(Path()))), ids=[name for name, _, _ in crafted(Path())])
def test_crafted_spec_is_refused_without_importing_anything(packed, tmp_path, monkeypatch, case):
    name, edit, message = crafted(tmp_path / "pwned")[case]
    (tmp_path / f"{EVIL}.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the module a crafted file names is importable: it must not be imported
    _, path = packed("llama")
    evil = rewrite(path, tmp_path / "evil.safetensors", lambda m: edit(m["spec"]["kwargs"]))
    spec = json.loads(json.dumps(hf_spec(tiny_config("llama"), "causal-lm")))
    edit(spec["kwargs"])
    before = set(sys.modules)
    with pytest.raises(QDistillError, match=message):
        load_packed(evil)
    with pytest.raises(QDistillError, match=message):
        build_model(spec, trust_code=False)
    assert set(sys.modules) == before and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_export_opens_with_transformers_and_computes_the_same(packed, tmp_path, kind):
    model, path = packed(kind)
    out = export_hf(path, tmp_path / "out")
    reopened = auto(kind).from_pretrained(out, local_files_only=True).eval()  # plain transformers, nothing of qdistill
    assert type(reopened) is type(model)
    assert torch.equal(outputs(reopened, tokens()), outputs(model, tokens()))
    assert {f.name for f in out.iterdir()} >= {"config.json", "model.safetensors"}


def test_export_refuses_a_directory_with_files_unless_asked(packed, tmp_path):
    _, path = packed("gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(QDistillError, match="not an empty directory.*--overwrite"):
        export_hf(path, out)
    assert [f.name for f in out.iterdir()] == ["tokenizer.json"]  # nothing written
    export_hf(path, out, overwrite=True)
    assert (out / "config.json").exists() and (out / "tokenizer.json").read_text() == "{}"  # the user's file is kept
    with pytest.raises(QDistillError, match="is a file, not a directory"):
        export_hf(path, out / "config.json", overwrite=True)
    source = out / "model.safetensors"
    source.write_bytes(path.read_bytes())  # a packed file where transformers writes its own
    with pytest.raises(QDistillError, match="holds"):
        export_hf(source, out, overwrite=True)
    assert source.read_bytes() == path.read_bytes()


def test_export_copies_the_tokenizer_that_transformers_then_opens(packed, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["the teacher's own tokenizer", "goes with the model"], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]").save_pretrained(tmp_path / "teacher")
    (tmp_path / "teacher" / "notes.py").write_text("raise SystemExit")  # not a tokenizer file: not copied
    out = export_hf(packed("gpt2")[1], tmp_path / "out", tokenizer_dir=tmp_path / "teacher")
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "teacher" / "tokenizer.json").read_bytes() and not (out / "notes.py").exists()
    text = "the model goes"
    assert AutoTokenizer.from_pretrained(out, local_files_only=True)(text)["input_ids"] == bpe.encode(text).ids
    with pytest.raises(QDistillError, match="no tokenizer files"):
        export_hf(packed("gpt2")[1], tmp_path / "other", tokenizer_dir=tmp_path / "out" / "..")
    assert not (tmp_path / "other").exists()


def test_export_that_fails_midway_leaves_the_directory_as_it_was(packed, tmp_path, monkeypatch):
    model, path = packed("gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # the user's earlier export

    def half_then_fail(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(path, out, overwrite=True)
    assert [f.name for f in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no half-written directory left beside it


def test_export_of_a_model_with_quantizers_attached_leaves_them_on(tmp_path):
    model = build_model(hf_spec(tiny_config("gpt2"), "causal-lm"))
    attached = attach(model, UniformQuantizer(3, 64))
    model.eval()
    save_pretrained_dir(model, tmp_path / "out")
    assert [qt.quantizer for qt in quantized_tensors(model)] == [qt.quantizer for qt in attached]  # a copy was baked
    reopened = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert torch.equal(outputs(reopened, tokens()), outputs(model, tokens()))


def test_export_refuses_a_model_that_is_not_a_transformers_model(tmp_path):
    from tests.format.test_packed import quantized_model

    path = save_packed(quantized_model(quantizer=UniformQuantizer(4, 64)), model_spec("tiny"), tmp_path / "conv.safetensors")
    with pytest.raises(QDistillError, match="not a transformers model"):
        export_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


_opened: list | None = None  # what is opened while a test watches


def _audit(event, args):
    if event == "open" and _opened is not None:
        _opened.append(args[0])


sys.addaudithook(_audit)  # idle unless a test watches; hooks cannot be removed


def test_nothing_touches_the_network_or_the_hugging_face_cache(pretrained, packed, tmp_path, monkeypatch):
    global _opened
    from huggingface_hub import constants

    def no_network(*args):
        raise AssertionError("opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    _opened = []
    try:
        load_hf(pretrained("gpt2")[0])
        build_model(hf_spec(tiny_config("llama"), "causal-lm"), trust_code=False)
        export_hf(packed("gpt2")[1], tmp_path / "out")
    finally:
        opened, _opened = _opened, None
    cache = Path(constants.HF_HOME).resolve()
    assert opened and not [p for p in opened if isinstance(p, (str, Path)) and Path(p).resolve().is_relative_to(cache)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["distill", "--student", "hf:/nonexistent"], "no such directory"),
        (["distill", "--student", "hf:{empty}"], "no config.json"),
        (["distill", "--teacher", "hf:/nonexistent", "--task", "lm"], "no such directory"),
        (["eval", "hf:{bert}"], "give --teacher hf:DIR"),
        (["export", "/nonexistent.safetensors", "{empty}/out"], "does not exist"),
    ],
)
def test_bad_hf_input_gives_one_clear_message(pretrained, tmp_path, capsys, argv, message):
    paths = {"empty": str(tmp_path), "bert": str(pretrained("bert")[0])}
    capsys.readouterr()  # what making the directory printed
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdistill: error:") and message in err and err.count("\n") == 1


def test_cli_distills_an_hf_student_from_an_hf_teacher_and_exports_it(tmp_path, capsys):
    """An hf: teacher with its weights, an hf: student from a config alone: qd at 4 bits, then eval and export;
    ptq of the teacher's own weights (--init hf:DIR)."""
    vocab = 300  # the text's BPE: the models' vocabulary must be the data's
    teacher = AutoModelForCausalLM.from_config(tiny_config("llama", vocab))
    teacher.save_pretrained(tmp_path / "teacher")
    config = tiny_config("gpt2", vocab)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(tmp_path / "student")
    common = ["--text-dir", str(text_folder(tmp_path / "texts")), "--vocab-size", str(vocab), "--seq-len", "32", "--quiet"]
    args = ["distill", "--method", "qd", "--bits", "4", "--student", f"hf:{tmp_path / 'student'}", "--teacher", f"hf:{tmp_path / 'teacher'}", "--epochs", "1"]
    assert main([*args, "--run-dir", str(tmp_path / "run"), *common]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["student"] == f"hf:{(tmp_path / 'student').resolve()}"  # --resume finds the directory from anywhere
    row = json.loads((tmp_path / "run" / "results.json").read_text())["rows"][0]
    packed = tmp_path / "run" / row["file"]
    model, meta = load_packed(packed)
    assert type(model).__name__ == "GPT2LMHeadModel" and meta["spec"] == hf_spec(tmp_path / "student")
    capsys.readouterr()
    assert main(["eval", str(packed), *common]) == 0
    assert json.loads(capsys.readouterr().out)["test_ppl"] == row["test_ppl"]
    assert main(["export", str(packed), str(tmp_path / "out")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(outputs(exported, ids), outputs(model, ids))
    assert main(["export", str(packed), str(tmp_path / "out")]) == 2  # refused: it holds the first export
    assert "--overwrite" in capsys.readouterr().err
    assert main(["eval", f"hf:{tmp_path / 'teacher'}", *common]) == 0  # the teacher, scored with its own weights
    teacher_ppl = json.loads(capsys.readouterr().out)["test_ppl"]
    ptq = ["distill", "--method", "ptq", "--bits", "8", "--init", f"hf:{tmp_path / 'teacher'}", "--run-dir", str(tmp_path / "ptq")]
    assert main([*ptq, *common]) == 0  # post-training quantization of the pretrained weights
    row = json.loads((tmp_path / "ptq" / "results.json").read_text())["rows"][0]
    assert type(load_packed(tmp_path / "ptq" / row["file"])[0]).__name__ == "LlamaForCausalLM"
    assert row["test_ppl"] == pytest.approx(teacher_ppl, rel=0.01)  # 8 bits: the teacher's weights, nearly


def test_damaged_weights_in_a_directory_are_one_clear_error(pretrained, tmp_path):
    import shutil

    shutil.copytree(pretrained("llama")[0], tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(QDistillError, match="cannot load the weights"):
        load_hf(tmp_path / "m")


LLAMA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "max_position_embeddings": 4096, "tie_word_embeddings": False}  # 6.7e9 values: within MAX_PARAMETERS


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_small_file_whose_spec_is_a_7b_llama_is_refused_before_anything_is_built(packed, pretrained, tmp_path, capsys):
    """A packed file or an hf: directory of 20k values whose config describes a 7B model: refused from the
    build on the meta device, not built (27 GB) and then found not to fit."""
    evil = rewrite(packed("llama")[1], tmp_path / "evil.safetensors", lambda m: m["spec"]["kwargs"]["config"].update(LLAMA_7B))
    shutil.copytree(pretrained("llama")[0], tmp_path / "dir")
    edit_config(tmp_path / "dir", **LLAMA_7B)
    with deadline(60), nothing_built_for_real():
        with pytest.raises(QDistillError, match=OUTGROWN):
            load_packed(evil)
        with pytest.raises(QDistillError, match=f"hf:.*dir: {OUTGROWN}"):
            load_hf(tmp_path / "dir")
        capsys.readouterr()
        assert main(["export", str(evil), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdistill: error:") and err.count("\n") == 1 and "nothing was built" in err
    assert not (tmp_path / "out").exists()


def t5_config(**changes):
    return T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, **changes)


def registration_hooks():
    from torch.nn.modules import module

    return [len(h) for h in (module._global_module_registration_hooks, module._global_parameter_registration_hooks, module._global_buffer_registration_hooks)]


def test_a_t5_of_ten_million_decoder_layers_is_refused_quickly(tmp_path):
    """No size limit names T5's num_decoder_layers: the build stops after a bounded number of modules per
    tensor in the file, from a directory or a packed file, where the tiny T5 itself loads."""
    torch.manual_seed(0)
    AutoModel.from_config(t5_config()).save_pretrained(tmp_path / "dir")
    spec = hf_spec(t5_config(), "encoder")
    model = build_model(spec)
    attach(model, UniformQuantizer(4, 64))
    path = save_packed(model, spec, tmp_path / "t5.safetensors")
    assert type(load_hf(tmp_path / "dir")[0]).__name__ == type(load_packed(path)[0]).__name__ == "T5Model"
    edit_config(tmp_path / "dir", num_decoder_layers=10**7)
    evil = rewrite(path, tmp_path / "evil.safetensors", lambda m: m["spec"]["kwargs"]["config"].update(num_decoder_layers=10**7))
    hooks = registration_hooks()
    refused = "its spec registers more than [0-9,]+ modules, parameters and buffers but its weights hold [0-9,]+ tensors: a damaged or crafted file"
    with deadline(30):
        with pytest.raises(QDistillError, match=refused):
            load_hf(tmp_path / "dir")
        with pytest.raises(QDistillError, match=refused):
            load_packed(evil)
    assert registration_hooks() == hooks  # the counting hooks are gone


def test_modules_built_by_another_thread_are_not_counted():
    """The registration hooks are global: a build on another thread at the same time neither counts nor is refused."""
    others = []

    def build():
        thread = threading.Thread(target=lambda: others.extend(nn.Linear(2, 2) for _ in range(2000)))
        thread.start()
        thread.join()
        return nn.Linear(2, 2)

    check_build(build, Held(tensors=2, values=6), "test")
    assert len(others) == 2000 and others[0].weight.device.type == "cpu"

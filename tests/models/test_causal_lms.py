"""Your own Hugging Face causal LM, end to end from the command line: a tiny random model of each architecture,
saved with its own tokenizer (tokenizer.json, an end-of-text token), distilled to 4 bits on a JSON-lines file,
then evaluated, sampled and exported to a save_pretrained folder that transformers opens with the packed
model's logits and the same tokenizer. Offline."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from qdistill import load_packed  # noqa: E402
from qdistill.cli import main  # noqa: E402
from tests.test_cli import text_folder  # noqa: E402

EOT = "<|endoftext|>"
VOCAB = 320  # the model's rows: more than the tokenizer's 300 ids, as real models pad theirs
SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64}
ARCHITECTURES = {  # model_type -> (class, config fields beyond SIZES)
    "gpt2": ("GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "n_inner": 64}),
    "llama": ("LlamaForCausalLM", {**SIZES, "num_key_value_heads": 1}),
    "qwen2": ("Qwen2ForCausalLM", {**SIZES, "num_key_value_heads": 1}),
    "mistral": ("MistralForCausalLM", {**SIZES, "num_key_value_heads": 1}),
    "phi": ("PhiForCausalLM", SIZES),
    "gpt_neox": ("GPTNeoXForCausalLM", SIZES),
}


def tokenizer_for(texts: Path) -> PreTrainedTokenizerFast:
    """A 300-token byte-level BPE trained on the texts, as transformers saves a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([p.read_text() for p in sorted(texts.iterdir())], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT)


def save_model(folder: Path, model_type: str, tokenizer) -> Path:
    cls, fields = ARCHITECTURES[model_type]
    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, architectures=[cls], bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def jsonl(path: Path, texts: Path) -> Path:
    """40 documents, one per line, under the key "body" (not "text": --text-field names it)."""
    docs = [p.read_text() for p in sorted(texts.iterdir())]
    path.write_text("".join(json.dumps({"id": i, "body": docs[i % len(docs)][i:]}) + "\n" for i in range(40)))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own-lm")
    texts = text_folder(folder / "texts")
    return folder, tokenizer_for(texts), jsonl(folder / "data.jsonl", texts)


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_distill_eval_generate_export_with_the_models_own_tokenizer(workspace, tmp_path, monkeypatch, capsys, model_type):
    folder, tokenizer, data = workspace
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path / "cache"))
    model_dir = save_model(tmp_path / model_type, model_type, tokenizer)
    text = ["--data", str(data), "--text-field", "body"]
    run = tmp_path / "run"
    argv = ["distill", "--teacher", f"hf:{model_dir}", "--init", f"hf:{model_dir}", "--method", "qd", "--bits", "4", "--seq-len", "32", "--epochs", "1", "--run-dir", str(run), "--quiet"]
    assert main([*argv, *text]) == 0
    row = json.loads((run / "results.json").read_text())["rows"][0]
    assert json.loads((run / "results.json").read_text())["config"]["lr"] == 1e-4  # fine-tuning a pretrained model, not 3e-3
    packed = run / row["file"]
    assert (run / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()  # beside the model, as transformers keeps it
    capsys.readouterr()
    assert main(["eval", str(packed), *text]) == 0
    assert json.loads(capsys.readouterr().out)["test_ppl"] == pytest.approx(row["test_ppl"])
    assert main(["generate", str(packed), "--prompt", "the quick", "--tokens", "5", "--temperature", "0", "--quiet"]) == 0  # no text needed
    assert capsys.readouterr().out.startswith("the quick")
    assert main(["export", str(packed), str(tmp_path / "out")]) == 0  # the tokenizer comes along
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert type(exported).__name__ == ARCHITECTURES[model_type][0]
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, load_packed(packed)[0].eval()(ids).logits)
    (run / "tokenizer.json").rename(run / "moved.json")  # the tokenizer it was trained with, gone: said, not guessed
    assert main(["generate", str(packed), "--prompt", "the"]) == 2
    assert "which is not beside it: give that model's folder with --tokenizer DIR" in capsys.readouterr().err
    assert main(["generate", str(packed), "--prompt", "the", "--tokenizer", str(folder / "texts")]) == 2  # a folder without one
    (run / "moved.json").rename(run / "tokenizer.json")
    sentence = "the lazy dog reads a line"
    assert AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True).encode(sentence) == tokenizer.encode(sentence)


def test_the_text_is_tokenized_as_autotokenizer_does_with_documents_ended_by_eos(workspace, tmp_path, monkeypatch):
    from qdistill.data.model_tokenizer import ModelTokenizer
    from qdistill.data.records import held_out_rows, records_corpus

    folder, tokenizer, data = workspace
    model_dir = save_model(tmp_path / "gpt2", "gpt2", tokenizer)
    own = ModelTokenizer.find(model_dir)
    corpus = records_corpus(data, "body", tmp_path / "cache", VOCAB, own)
    assert corpus.vocab_size == VOCAB and corpus.model_tokenizer.key == own.key
    auto = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    docs = [json.loads(line)["body"] for line in data.read_text().splitlines()]
    assign = held_out_rows(len(docs), ["val", "test"])  # the data have one split: val and test are held out of it
    for split in ("train", "val", "test"):
        stream, eos = [int(i) for i in corpus.split(split)], auto.eos_token_id
        documents = [stream[a + 1 : b] for a, b in zip([-1] + [i for i, t in enumerate(stream) if t == eos], [i for i, t in enumerate(stream) if t == eos] + [len(stream)])]
        assert documents == [auto.encode(d) for d, s in zip(docs, assign) if s == split]  # AutoTokenizer's ids, eos between documents


def test_different_tokenizers_of_teacher_and_student_are_refused(workspace, tmp_path, monkeypatch, capsys):
    folder, tokenizer, data = workspace
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path / "cache"))
    teacher = save_model(tmp_path / "teacher", "llama", tokenizer)
    other = tokenizer_for(text_folder(tmp_path / "other-texts"))
    other.add_tokens(["qdistill"])  # another vocabulary
    student = save_model(tmp_path / "student", "llama", other)
    argv = ["distill", "--teacher", f"hf:{teacher}", "--init", f"hf:{student}", "--method", "qd", "--bits", "4", "--data", str(data), "--text-field", "body", "--run-dir", str(tmp_path / "run")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdistill: error:") and "different tokenizers" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    argv[4] = f"hf:{teacher}"  # one tokenizer, but a BPE size asked for too
    assert main([*argv, "--vocab-size", "300"]) == 2
    assert "leave --vocab-size out" in capsys.readouterr().err


def test_a_window_longer_than_the_models_positions_is_one_clear_error(workspace, tmp_path, monkeypatch, capsys):
    folder, tokenizer, data = workspace
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path / "cache"))
    model_dir = save_model(tmp_path / "gpt2", "gpt2", tokenizer)
    capsys.readouterr()
    assert main(["eval", f"hf:{model_dir}", "--data", str(data), "--text-field", "body"]) == 2  # the default window, 128, past its 64
    err = capsys.readouterr().err  # (after transformers' loading bar, which the command turns off before transformers loads, and the log)
    assert err.splitlines()[-1].startswith("qdistill: error:") and "--seq-len 64 or less" in err and "Traceback" not in err
    assert main(["generate", f"hf:{model_dir}", "--prompt", "the", "--tokens", "70", "--temperature", "0"]) == 0  # sees its last 64 tokens


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_gguf_export_of_each_architecture_llama_cpp_maps(workspace, tmp_path, monkeypatch, capsys, model_type):
    """Q4_1's layout, distilled, to GGUF with the tokenizer from the run directory; the gguf package reads every weight back as packed."""
    gguf = pytest.importorskip("gguf")
    from qdistill.export.gguf import read_gguf_weights

    folder, tokenizer, data = workspace
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path / "cache"))
    model_dir = save_model(tmp_path / model_type, model_type, tokenizer)
    argv = ["distill", "--teacher", f"hf:{model_dir}", "--init", f"hf:{model_dir}", "--method", "qd", "--bits", "4", "--groups", "row", "--bucket", "32",
            "--scale-dtype", "float16", "--seq-len", "32", "--epochs", "1", "--run-dir", str(tmp_path / "run"), "--quiet", "--data", str(data), "--text-field", "body"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run" / "qd-4b.safetensors"), str(tmp_path / "m.gguf"), "--format", "gguf"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "the gguf package reads every weight back within 0.0e+00" in said and "no tokenizer" not in said
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[model_type]
    assert int(reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tokenizer.eos_token_id
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB  # the tokenizer's 300, padded to the model's rows
    q4_1 = [t.name for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1]
    assert len(q4_1) == 7 * 2 + 2 and {"blk.0.attn_q.weight", "token_embd.weight", "output.weight"} <= set(q4_1)  # every Linear of both layers, the tables
    assert all(v.dtype.kind == "f" for v in read_gguf_weights(tmp_path / "m.gguf").values())

"""Property-based fuzz of what users receive from others, beyond packed files (tests/export/test_untrusted.py):
run directories, training configs, token files, tokenizers and Hugging Face folders. Whatever they hold,
reading them gives a result or one QDistillError: never another exception, a hang or code they name."""

import json
import math

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qdistill.cli
import qdistill.data.dataset
import qdistill.models
from qdistill import QDistillError, TrainConfig
from qdistill.cli import main
from qdistill.train.config import read_yaml

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["os:system", "tests.conftest:toy_net", "hf:/nowhere", "fashion-mnist", "tiny", "qd", "2", "cuda"]),
)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6)
CONFIG_KEYS = [f for f in TrainConfig.__dataclass_fields__]


class ReachedTheData(Exception):
    """Raised where a resumed run would read its data: its arguments passed every check."""


@FUZZ
@given(saved=st.dictionaries(st.sampled_from([*qdistill.cli.distill_options(), "command", "func", "junk"]), JSON, max_size=6),
       config=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, max_size=4))
def test_any_run_dir_resumes_or_is_one_error_and_runs_no_code(tmp_path_factory, monkeypatch, capsys, saved, config):
    folder = tmp_path_factory.mktemp("run")
    (folder / "run.json").write_text(json.dumps({"command": "distill", **saved}))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(qdistill.cli, "task_from", lambda *a, **k: (_ for _ in ()).throw(ReachedTheData()))
    for module in (qdistill.data.dataset, qdistill.models):
        monkeypatch.setattr(module, "load_object", lambda *a: pytest.fail(f"imported code a run directory names: {a}"))
    monkeypatch.setattr(qdistill.cli, "load_any", lambda *a, **k: (_ for _ in ()).throw(ReachedTheData()))
    try:
        rc = main(["distill", "--resume", str(folder)])
    except ReachedTheData:
        return
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("qdistill: error: ") and err.count("\n") == 1, err


@FUZZ
@given(values=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, max_size=5))
def test_any_config_is_a_config_or_one_error(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    try:
        cfg = TrainConfig.from_dict(read_yaml(path))
    except QDistillError:
        return
    for name, value in cfg.to_dict().items():  # what was accepted is of its declared type
        if isinstance(value, float):
            assert math.isfinite(value), name


@FUZZ
@given(
    dtype=st.sampled_from(["uint8", "uint16", "int32", "int64", "float32", "float64", "bool", "complex64"]),
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
    values=st.integers(-(2**40), 2**40),
    vocab=st.integers(-5, 2**34),
    suffix=st.sampled_from([".npy", ".bin"]),
    damage=st.sampled_from(["none", "truncate", "garbage", "pickle"]),
)
def test_any_token_files_are_a_corpus_or_one_error(tmp_path_factory, dtype, shape, values, vocab, suffix, damage):
    from qdistill.data.text import load_token_files

    folder = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(abs(values) % 2**32)
    array = (rng.integers(-3, 3, size=shape) * (values % 1000)).astype(dtype)
    paths = []
    for split in ("train", "val", "test"):
        path = folder / f"{split}{suffix}"
        if suffix == ".npy":
            np.save(path, np.array([array], dtype=object) if damage == "pickle" else array, allow_pickle=True)
        else:
            path.write_bytes(array.tobytes())
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        elif damage == "garbage":
            path.write_bytes(bytes(rng.integers(0, 256, size=int(rng.integers(0, 64))).astype(np.uint8)))
        paths.append(str(path))
    try:
        corpus = load_token_files(*paths, vocab_size=vocab)
    except QDistillError:
        return
    for split in ("train", "val", "test"):
        ids = corpus.split(split)
        assert len(ids) >= 2 and int(ids.min()) >= 0 and int(ids.max()) < vocab


def mutations():
    """Paths into a tokenizer.json and what to put there."""
    return st.lists(st.tuples(st.sampled_from(["model", "pre_tokenizer", "normalizer", "post_processor", "decoder", "added_tokens", "model.vocab", "model.type", "model.unk_token", "truncation"]), JSON), min_size=1, max_size=3)


@FUZZ
@given(edits=mutations())
def test_any_tokenizer_json_is_a_tokenizer_or_one_error(tmp_path_factory, edits):
    tokenizers = pytest.importorskip("tokenizers")
    from qdistill.data.text import load_tokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "list", "of"])}
    spec = json.loads(tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]")).to_str())
    for where, value in edits:
        node = spec
        *parents, key = where.split(".")
        for p in parents:
            node = node[p] if isinstance(node.get(p), dict) else node.setdefault(p, {}) if not isinstance(node.get(p), (list, str, int, float, bool)) else {}
        node[key] = value
    path = tmp_path_factory.mktemp("tokj") / "tokenizer.json"
    path.write_text(json.dumps(spec))
    try:
        tok = load_tokenizer(path)
    except QDistillError:
        return
    tok.encode("the list of")


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(["model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "intermediate_size", "max_position_embeddings", "num_decoder_layers", "d_model", "auto_map", "text_config", "torch_dtype"]), JSON, min_size=1, max_size=3))
def test_any_hf_folder_is_a_model_or_one_error(tmp_path_factory, edits):
    transformers = pytest.importorskip("transformers")
    from qdistill.models import load_hf

    folder = tmp_path_factory.mktemp("hf")
    config = transformers.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    spec = json.loads((folder / "config.json").read_text())
    spec.update(edits)
    (folder / "config.json").write_text(json.dumps(spec))
    try:
        model, _ = load_hf(folder)
    except QDistillError:
        return
    assert sum(p.numel() for p in model.parameters()) < 10**6

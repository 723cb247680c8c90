"""A model's own tokenizer, read as data from its folder: its end-of-text token, its key, and the folders it refuses."""

import json

import pytest

pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from qdistill.data.model_tokenizer import ModelTokenizer, same_tokenizer  # noqa: E402
from qdistill.errors import QDistillError  # noqa: E402

EOS = "</s>"


def save(folder, eos=EOS, config=True, extra=()):
    folder.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world, a small text"] * 4, trainers.BpeTrainer(vocab_size=280, special_tokens=[EOS, *extra], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    if config:
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return folder


def test_the_end_token_is_read_from_the_config_in_either_form(tmp_path):
    assert ModelTokenizer.find(save(tmp_path / "a")).eos_id == 0
    folder = save(tmp_path / "b", config=False)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": EOS, "lstrip": False}}))
    assert ModelTokenizer.find(folder).eos_id == 0
    assert ModelTokenizer.find(save(tmp_path / "c", config=False)).eos_id is None  # none named: documents are joined as they are


def test_the_key_names_the_tokenizer_not_the_files_formatting(tmp_path):
    a = ModelTokenizer.find(save(tmp_path / "a"))
    b = save(tmp_path / "b")
    (b / "tokenizer.json").write_text(json.dumps(json.loads((b / "tokenizer.json").read_text()), indent=4))
    assert ModelTokenizer.find(b).key == a.key and same_tokenizer(a, ModelTokenizer.find(b)) is a
    other = ModelTokenizer.find(save(tmp_path / "c", extra=("<pad>",)))
    assert other.key != a.key
    with pytest.raises(QDistillError, match="different tokenizers"):
        same_tokenizer(a, other)
    with pytest.raises(QDistillError, match="embeds 100 tokens"):
        a.check_fits(100, "the model")


def test_a_folder_without_a_tokenizer_is_none_and_a_slow_one_is_refused_with_the_fix(tmp_path):
    (tmp_path / "none").mkdir()
    assert ModelTokenizer.find(tmp_path / "none") is None
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(QDistillError, match="no tokenizer.json.*save_pretrained"):
        ModelTokenizer.find(tmp_path / "slow")


@pytest.mark.parametrize("case, message", [
    ("eos", "'<eos>' its tokenizer config names is not in its tokenizer.json"),
    ("config", "tokenizer_config.json is not valid JSON"),
    ("tokenizer", "is not a tokenizer.json the tokenizers library can use"),
])
def test_damaged_or_crafted_files_are_one_clear_error(tmp_path, case, message):
    folder = save(tmp_path / "m", eos="<eos>" if case == "eos" else EOS)
    if case == "config":
        (folder / "tokenizer_config.json").write_text("{not json")
    if case == "tokenizer":
        (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}))
    with pytest.raises(QDistillError, match=message.replace("(", r"\(")):
        ModelTokenizer.find(folder)

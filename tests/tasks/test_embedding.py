"""The sentence-embedding task on a tiny BERT: pooling, the metrics on known tensors, the teacher's
embeddings cached once, and qd against ptq at 2 bits."""

import copy

import pytest
import torch

from qdistill import QDistillError, TrainConfig, train
from qdistill.tasks.embedding import Encoded, SentenceEmbedding, layer_loss, mean_pool, neighbour_recall, retrieval_recall

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a list dict of keys values returns new module function file path open read write close string bytes int".split()


def tokenizer():
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    return tok


def sentences(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)) for _ in range(n)]


def bert(seed=0, pooler=False, layers=1):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=4 + len(WORDS), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config, add_pooling_layer=pooler)  # a saved encoder keeps its pooler, as MiniLM's does


def task(reference, n_train=256, cache_dir=None):
    sections = {s: list(zip(sentences(24, seed), sentences(24, seed + 100))) for s, seed in (("val", 1), ("test", 2))}
    return SentenceEmbedding({"train": sentences(n_train, 0), "val": sentences(40, 1), "test": sentences(60, 2)}, sections, tokenizer(), reference, max_len=16, cache_dir=cache_dir)


def test_mean_pool_leaves_padding_out():
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = hidden.clone()
    padded[0, 3:] = 1e3  # what padding positions hold must not matter
    expected = torch.nn.functional.normalize(hidden[0, :3].mean(0), dim=0)
    assert torch.allclose(mean_pool(padded, mask)[0], expected, atol=1e-6)


def test_metrics_on_known_embeddings():
    e = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    assert neighbour_recall(e, e, k=10) == 1.0
    assert neighbour_recall(e[torch.randperm(50)], e, k=10) < 0.5  # neighbours scrambled
    assert retrieval_recall(e, e) == {1: 1.0, 10: 1.0}
    shifted = retrieval_recall(e, e.roll(1, 0))  # every answer is another's document
    assert shifted[1] == 0.0
    collapsed = torch.ones(50, 8) / 8**0.5  # a broken model embedding everything alike retrieves nothing
    assert retrieval_recall(collapsed, collapsed) == {1: 0.0, 10: 0.0}


def test_too_few_held_out_sentences_and_a_foreign_model_are_refused():
    reference = bert()
    with pytest.raises(QDistillError, match="at least 2 test sentences"):
        SentenceEmbedding({"train": sentences(8, 0), "val": sentences(4, 1), "test": sentences(1, 2)}, {}, tokenizer(), reference)
    wider = transformers.BertModel(transformers.BertConfig(vocab_size=4 + len(WORDS), hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    with pytest.raises(QDistillError, match="48 dimensions, its teacher's 32"):
        task(reference).evaluate(wider, "val")


def test_teacher_agrees_with_itself_and_a_stranger_does_not():
    reference = bert()
    t = task(reference)
    own = t.evaluate(copy.deepcopy(reference), "test")
    assert own["cos"] == pytest.approx(1.0, abs=1e-5) and own["nbr10"] == 1.0 and set(own) == {"cos", "nbr10", "r1", "r10"}
    other = t.evaluate(bert(seed=1), "test")
    assert other["cos"] < 0.99 and other["nbr10"] < 1.0
    batch = t.train_batch(0, 0, TrainConfig(batch_size=8))
    assert batch["x"].shape[1] == int(batch["mask"].sum(1).max())  # as wide as its longest sentence


def test_teacher_embeddings_are_cached_once(tmp_path, monkeypatch):
    reference = bert()
    t = task(reference)
    first = t.teacher(reference, TrainConfig(), tmp_path)
    monkeypatch.setattr(t, "embed", lambda *a: pytest.fail("recomputed the cached embeddings"))
    again = t.teacher(reference, TrainConfig(), tmp_path)
    assert torch.equal(first.logits, again.logits) and first.logits.shape == (256, 32)


def test_the_references_held_out_embeddings_are_computed_once_for_every_run(tmp_path, monkeypatch):
    """Evaluating embeds each split with the teacher too: kept in the cache, a second run (a new task) reads them."""
    reference, student = bert(), bert(seed=1)
    first = task(reference, cache_dir=tmp_path).evaluate(student, "val")
    again = task(reference, cache_dir=tmp_path)
    embed = again.embed
    monkeypatch.setattr(again, "embed", lambda model, *a: pytest.fail("embedded with the teacher again") if model is reference else embed(model, *a))
    assert again.evaluate(student, "val") == first and len(list(tmp_path.iterdir())) == 1


def test_cached_teacher_embeddings_are_on_the_teachers_device(tmp_path, monkeypatch):
    """The student's embeddings are compared with them on the training device (a CUDA one, say): run on
    the meta device, which needs no GPU, with the embeddings found in the cache."""
    import qdistill.tasks.embedding

    reference = bert()
    t = task(reference)
    t.teacher(reference, TrainConfig(), tmp_path)
    digest = qdistill.tasks.embedding.model_digest(reference)
    monkeypatch.setattr(qdistill.tasks.embedding, "model_digest", lambda model: digest)  # meta tensors hold no values to hash
    cached = t.teacher(copy.deepcopy(reference).to("meta"), TrainConfig(), tmp_path)
    assert cached({"index": torch.arange(4, device="meta")}).device.type == "meta"


@pytest.mark.parametrize("how", ["link", "writable"])
def test_a_cache_others_could_write_is_not_read(tmp_path, how):
    """Whoever can write the cached embeddings chooses the training targets: such an entry is recomputed."""
    reference = bert()
    t = task(reference)
    first = t.teacher(reference, TrainConfig(), tmp_path)
    cached = next(tmp_path.glob("teacher-embeddings-*.npy"))
    import numpy as np

    planted = tmp_path / "planted.npy"
    np.save(planted, np.zeros((256, 32), dtype=np.float32))
    cached.unlink()
    if how == "link":
        cached.symlink_to(planted)
    else:
        planted.rename(cached)
        cached.chmod(0o666)
    again = t.teacher(reference, TrainConfig(), tmp_path)
    assert torch.equal(first.logits, again.logits)


def test_a_tokenizer_that_panics_is_one_error(tmp_path):
    from tests.data.test_text import broken_tokenizer

    good = tmp_path / "good.json"
    tokenizer().save(str(good))
    t = task(bert())
    t.tokenizer = tokenizers.Tokenizer.from_file(str(broken_tokenizer(good, tmp_path / "bad.json", "panic")))
    with pytest.raises(QDistillError, match="the tokenizer failed"):
        t._encode(t.tokenizer, ["the list"])


def test_the_relational_term_weighs_the_batchs_similarity_matrix():
    """Each embedding's cosine to its target, plus `relational` times the squared error of the batch's
    cosine similarities: two students equally close to their targets differ in how they keep neighbours."""
    g = torch.Generator().manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    out = torch.nn.functional.normalize(target + 0.3 * torch.randn(8, 16, generator=g), dim=1)
    t = task(bert())
    plain = t.loss(out, target, {}, TrainConfig())
    assert torch.isclose(plain, (1 - (out * target).sum(-1)).mean())
    weighed = t.loss(out, target, {}, TrainConfig(relational=2.0))
    assert torch.isclose(weighed - plain, 2.0 * ((out @ out.T - target @ target.T) ** 2).mean()) and weighed > plain
    assert t.loss(target, target, {}, TrainConfig(relational=2.0)) < 1e-6


def test_the_layer_wise_term_compares_each_layers_real_tokens_relative_to_the_teachers():
    g = torch.Generator().manual_seed(0)
    teacher = tuple(3 * torch.randn(2, 5, 8, generator=g) for _ in range(3))  # embeddings' output and 2 layers
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    student = tuple(t.clone() for t in teacher)
    assert layer_loss(student, teacher, mask) == 0
    student[1][0, 4] += 100.0  # padding: not compared
    assert layer_loss(student, teacher, mask) == 0
    student[2][1] += 1.0  # one layer off by a known amount, relative to the teacher's mean square
    real = mask.unsqueeze(-1).float()
    expected = (8 * 5) / (teacher[2].square() * real).sum() / 3
    assert torch.isclose(layer_loss(student, teacher, mask), expected)
    assert torch.isclose(layer_loss(tuple(2 * s for s in teacher), tuple(2 * t for t in teacher), mask), torch.tensor(0.0))
    half = (teacher[0], teacher[2])  # a 1-layer student follows the teacher's last of 2
    assert layer_loss(half, teacher, mask) == 0
    with pytest.raises(QDistillError, match="layers divide"):
        layer_loss(teacher, teacher + teacher[:3], mask)  # 2 layers against 5


def test_a_student_in_training_is_compared_with_its_live_teacher_layer_by_layer():
    """With hidden_states the teacher runs live and gives its layers; the student in training gives its own;
    evaluation still sees pooled embeddings alone."""
    reference = bert(layers=2)
    t = task(reference)
    cfg = TrainConfig(method="qd", hidden_states=1.0)
    teacher = t.teacher(reference, cfg, cache_dir=None)
    batch = t.train_batch(0, 0, TrainConfig(batch_size=4))
    target = teacher(batch)
    assert isinstance(target, Encoded) and len(target.hidden) == 3
    student = bert(seed=1, layers=2).train()
    out = t.forward(student, batch)
    assert isinstance(out, Encoded) and len(out.hidden) == 3
    plain = t.loss(out, target, batch, TrainConfig())
    weighed = t.loss(out, target, batch, cfg)
    assert torch.isclose(weighed - plain, layer_loss(out.hidden, target.hidden, batch["mask"])) and weighed > plain
    assert not isinstance(t.forward(student.eval(), batch), Encoded)
    t.teacher(reference, TrainConfig(method="qd"), cache_dir=None)  # a run without layer-wise targets asks no model for its layers
    assert not isinstance(t.forward(student.train(), batch), Encoded)


def test_hidden_states_train_the_students_layers_toward_the_teachers(tmp_path):
    """A student distilled with the layer-wise term ends closer to the teacher's token states than one
    distilled on the pooled embedding alone (same steps, same seed)."""
    reference = bert(layers=2)
    t = task(reference, n_train=128)
    batch = t.train_batch(0, 0, TrainConfig(batch_size=32))
    errors = {}
    for weight in (0.0, 1.0):
        cfg = TrainConfig(method="qd", bits=4, epochs=4, lr=3e-3, optimizer="adamw", batch_size=32, hidden_states=weight, dropout=0.0)
        student = train(copy.deepcopy(reference), t, cfg, teacher=reference, cache_dir=tmp_path, final_eval=False).model
        with torch.no_grad():
            errors[weight] = layer_loss(t.encode(student.eval(), batch).hidden, t.encode(reference, batch).hidden, batch["mask"]).item()
    assert errors[1.0] < 0.7 * errors[0.0]


def test_dropout_is_set_for_the_run():
    """`dropout: 0` turns a pretrained student's dropout off while it trains (a student in training mode then
    computes what it computes in eval mode); null keeps the model's own."""
    reference = bert()
    t = task(reference, n_train=64)
    batch = t.train_batch(0, 0, TrainConfig(batch_size=8))
    for dropout, expected in ((0.0, 0.0), (None, 0.1)):
        student = bert()  # the reference's weights
        cfg = TrainConfig(method="kd", epochs=1, lr=1e-3, optimizer="adamw", batch_size=32, dropout=dropout, teacher_logits="live")
        train(student, t, cfg, teacher=reference, final_eval=False)
        assert {m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)} == {expected}
        with torch.no_grad():
            same = torch.equal(t.forward(student.train(), batch), t.forward(student.eval(), batch))
        assert same == (dropout == 0.0)
    with pytest.raises(QDistillError, match="dropout must be"):
        TrainConfig(dropout=1.0)


def test_a_method_without_a_teacher_is_refused():
    reference = bert()
    with pytest.raises(QDistillError, match="teacher"):
        train(copy.deepcopy(reference), task(reference), TrainConfig(method="qat", bits=4, epochs=1, batch_size=32))


def test_qd_agrees_with_the_teacher_better_than_ptq_at_2_bits(tmp_path):
    reference = bert()
    t = task(reference, n_train=512)
    cfg = TrainConfig(method="qd", bits=2, bucket=32, epochs=3, batch_size=32, optimizer="adamw", lr=3e-3, weight_decay=0.0, schedule="cosine")
    ptq = train(copy.deepcopy(reference), t, cfg.replace(method="ptq"))
    qd = train(copy.deepcopy(reference), t, cfg, teacher=reference, cache_dir=tmp_path)
    assert set(qd.val) == {"cos", "nbr10", "r1", "r10"}
    assert qd.val["cos"] > ptq.val["cos"] + 0.01


def rest_folder(path, files=12):
    """reST files of titled sections of WORDS sentences: a sentence corpus for the command line."""
    path.mkdir()
    for i in range(files):
        body = []
        for j in range(3):
            title = f"Section {i} {j}"
            body += [title, "=" * len(title), "", " ".join(s.capitalize() + "." for s in sentences(8, 10 * i + j) if len(s.split()) >= 6), ""]
        (path / f"doc{i}.rst").write_text("\n".join(body))
    return path


def test_command_line_distills_an_encoder_into_a_low_bit_copy_and_evaluates_it(tmp_path, capsys):
    import json

    from qdistill.cli import main
    from qdistill.format.packed import read_packed

    teacher = bert(pooler=True)
    teacher.config.architectures = ["BertModel"]
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer().save(str(tmp_path / "teacher" / "tokenizer.json"))
    texts = ["--text-dir", str(rest_folder(tmp_path / "texts")), "--seq-len", "12", "--quiet"]
    hf = f"hf:{tmp_path / 'teacher'}"
    options = ["--groups", "row", "--bucket", "16", "--zero-point", "int", "--bucket-by-name", "*word_embeddings*=32", "--hidden-states", "1", "--dropout", "0"]
    assert main(["distill", "--teacher", hf, "--method", "qd", "--bits", "4", "--epochs", "1", "--run-dir", str(tmp_path / "run"), *options, *texts]) == 0
    row = json.loads((tmp_path / "run" / "results.json").read_text())["rows"][0]
    assert row["bits"] == 4 and 0.5 < row["test_cos"] <= 1.0 and {"test_nbr10", "test_r1", "test_r10"} <= set(row)
    buckets = {e["name"]: e["bucket"] for e in read_packed(tmp_path / "run" / row["file"])[0]["quantized"]}
    assert buckets["embeddings.word_embeddings.weight"] == 32 and set(buckets.values()) == {16, 32}
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / row["file"]), "--teacher", hf, "--text-dir", texts[1]]) == 0  # max_len: the file's
    assert json.loads(capsys.readouterr().out)["test_cos"] == row["test_cos"]  # the packed file scores as trained
    assert main(["eval", str(tmp_path / "run" / row["file"]), *texts]) == 2
    assert "give --teacher hf:DIR" in capsys.readouterr().err


def test_command_line_distills_an_encoder_on_the_rows_of_a_data_file(tmp_path, capsys):
    """--data serves the embedding task too: each row a sentence, the file's splits (or held-out rows); cosine and neighbours."""
    import json

    from qdistill.cli import main

    pytest.importorskip("datasets")
    teacher = bert(pooler=True)
    teacher.config.architectures = ["BertModel"]
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer().save(str(tmp_path / "teacher" / "tokenizer.json"))
    rows = sentences(300, 7)
    (tmp_path / "rows.csv").write_text("sentence,n\n" + "".join(f"{s},{i}\n" for i, s in enumerate(rows)))
    data = ["--data", str(tmp_path / "rows.csv"), "--text-field", "sentence", "--seq-len", "12", "--quiet"]
    hf = f"hf:{tmp_path / 'teacher'}"
    assert main(["distill", "--teacher", hf, "--method", "qd", "--bits", "4", "--epochs", "1", "--run-dir", str(tmp_path / "run"), *data]) == 0
    row = json.loads((tmp_path / "run" / "results.json").read_text())["rows"][0]
    assert 0.5 < row["test_cos"] <= 1.0 and "test_nbr10" in row and "test_r1" not in row  # no titled sections in rows
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / row["file"]), "--teacher", hf, *data]) == 0
    assert json.loads(capsys.readouterr().out)["test_cos"] == row["test_cos"]


def test_command_line_embedding_errors_are_one_line(tmp_path, capsys):
    from qdistill.cli import main

    for argv, message in [(["train-teacher", "--task", "embedding"], "pretrained sentence encoder"),
                          (["distill", "--task", "embedding", "--method", "qd"], "give --teacher hf:DIR")]:
        assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("qdistill: error:") and message in err and err.count("\n") == 1


def test_from_folder_cuts_the_subsets_asked_for_and_names_a_missing_tokenizer(tmp_path):
    from qdistill.data.sentences import load_sentences

    folder = rest_folder(tmp_path / "texts")
    tokenizer().save(str(tmp_path / "tokenizer.json"))
    t = SentenceEmbedding.from_folder(folder, tmp_path / "tokenizer.json", bert(), train_subset=5, eval_subset=3, max_len=12)
    assert [len(t.sentences[s][0]) for s in ("train", "val", "test")] == [5, 3, 3] and t.max_len == 12
    whole = SentenceEmbedding.from_folder(folder, tmp_path / "tokenizer.json", bert())
    assert len(whole.sentences["train"][0]) == len(load_sentences(folder, "train")) > 5
    with pytest.raises(QDistillError, match="not found.*--tokenizer"):
        SentenceEmbedding.from_folder(folder, tmp_path / "missing.json", bert())
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(QDistillError, match="not a tokenizer.json"):
        SentenceEmbedding.from_folder(folder, tmp_path / "bad.json", bert())

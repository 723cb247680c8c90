"""The language-modelling task: windows over a token stream, the token-level loss, perplexity, top-k targets."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from qdistill.data.text import TokenCorpus
from qdistill.distill.loss import TopKTarget, distillation_loss, topk_kl
from qdistill.distill.teacher import TopKTeacher
from qdistill.errors import QDistillError
from qdistill.tasks import TASKS, LanguageModelling, generate
from qdistill.train import TrainConfig, train

VOCAB = 11


def corpus(n_train=203, n_val=41, n_test=37, seed=0) -> TokenCorpus:
    """A stream where each token mostly follows from the one before: learnable, far from uniform."""
    rng = np.random.default_rng(seed)

    def stream(n):
        out = [0]
        for _ in range(n - 1):
            out.append((out[-1] * 3 + 1) % VOCAB if rng.random() < 0.9 else int(rng.integers(VOCAB)))
        return np.array(out, dtype=np.uint16)

    return TokenCorpus("toy", VOCAB, stream(n_train), stream(n_val), stream(n_test), {"train": 400, "val": 80, "test": 70}, None, "toy0")


class TinyLM(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, hidden)
        self.rnn = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def test_windows_cover_the_stream_once_and_pad_the_last():
    task = LanguageModelling(corpus(), seq_len=16)
    tokens = task.corpus.train
    assert task.train_size() == math.ceil((len(tokens) - 1) / 16)
    batch = task.batch("train", list(range(task.train_size())))
    x, y = batch["x"].reshape(-1), batch["y"].reshape(-1)
    real = y != -100
    assert int(real.sum()) == len(tokens) - 1  # every token but the first is a label exactly once
    assert torch.equal(y[real], torch.from_numpy(tokens[1:].astype(np.int64)))
    assert torch.equal(x[real], torch.from_numpy(tokens[:-1].astype(np.int64)))
    assert not bool(real[-1])  # 202 labels in 13 windows of 16: the last is padded


def test_epoch_order_visits_every_window_once():
    task = LanguageModelling(corpus(), seq_len=16)
    cfg = TrainConfig(batch_size=5, seed=3)
    steps = math.ceil(task.train_size() / 5)
    seen = torch.cat([task.train_batch(1, p, cfg)["index"] for p in range(steps)])
    assert sorted(seen.tolist()) == list(range(task.train_size()))
    assert seen.tolist() != list(range(task.train_size()))  # shuffled
    assert torch.equal(task.train_batch(1, 2, cfg)["x"], task.train_batch(1, 2, cfg)["x"])  # a function of the step alone


class Uniform(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.zeros(*x.shape, VOCAB) + 0 * self.w


def test_a_uniform_model_has_the_vocabulary_as_perplexity():
    task = LanguageModelling(corpus(), seq_len=8)
    m = task.evaluate(Uniform(), "test")
    assert m["ppl"] == pytest.approx(VOCAB) and m["tokens"] == 36
    assert m["bpb"] == pytest.approx(36 * math.log2(VOCAB) / 70)


def test_a_model_of_another_vocabulary_is_refused():
    """A Hugging Face model brings its own vocabulary; it must be the data's (wider: the teacher cache's ids overflow)."""

    class Wider(Uniform):
        def forward(self, x):
            return torch.zeros(*x.shape, VOCAB + 1) + 0 * self.w

    task = LanguageModelling(corpus(), seq_len=8)
    with pytest.raises(QDistillError, match=f"predicts {VOCAB + 1} tokens, the data have a vocabulary of {VOCAB}"):
        task.evaluate(Wider(), "test")


def test_padding_does_not_change_the_loss():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, VOCAB), torch.randn(2, 5, VOCAB)
    y = torch.randint(0, VOCAB, (2, 5))
    padded_y = y.clone()
    padded_y[1, 3:] = -100
    base = distillation_loss(s[:, :3], y[:, :3], t[:, :3]) * 6 + distillation_loss(s[0:1, 3:], y[0:1, 3:], t[0:1, 3:]) * 2
    changed = s.clone()
    changed[1, 3:] += 100  # garbage on padding
    assert distillation_loss(changed, padded_y, t) * 8 == pytest.approx(base.item(), rel=1e-5)


def test_topk_kl_is_the_kl_of_the_top_k_and_the_rest():
    torch.manual_seed(0)
    s, t = torch.randn(30, VOCAB, dtype=torch.float64), torch.randn(30, VOCAB, dtype=torch.float64) * 2
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    s[0, 0] = 40.0  # one row whose top k hold nearly all the mass: its rest must not cancel to garbage
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    for k in (VOCAB, 3):
        idx = p.topk(k).indices
        pk, qk = p.gather(-1, idx), q.gather(-1, idx)
        p_rest, q_rest = 1 - pk.sum(-1), 1 - qk.sum(-1)
        want = (pk * (pk / qk).log()).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest.clamp(min=1e-12).log()
        leaf = s.clone().requires_grad_(True)
        got = topk_kl(leaf, TopKTarget(p.log().gather(-1, idx), idx, 2.0), 2.0)
        got.backward()
        assert got.item() == pytest.approx(want.mean().item(), rel=1e-5) and bool(leaf.grad.isfinite().all())  # float32 inside
        assert k < VOCAB or got.item() == pytest.approx((p * (p / q).log()).sum(-1).mean().item(), rel=1e-5)  # all k: the full KL
    with pytest.raises(Exception, match="temperature"):
        topk_kl(s, TopKTarget(p.log().gather(-1, idx), idx, 1.0), 2.0)


def test_topk_teacher_cache_is_reused_and_looks_up_the_batch_windows(tmp_path):
    torch.manual_seed(0)
    task, model = LanguageModelling(corpus(), seq_len=8), TinyLM()
    cfg = TrainConfig(topk=4, temperature=2.0)
    teacher = task.teacher(model, cfg, tmp_path)
    assert isinstance(teacher, TopKTeacher) and len(list(tmp_path.iterdir())) == 1
    batch = task.batch("train", [5, 1, 17])  # any order
    target = teacher(batch)
    with torch.no_grad():
        want = torch.log_softmax(model(batch["x"]) / 2, -1).topk(4)
    assert torch.equal(target.indices, want.indices)
    assert torch.allclose(target.logprobs, want.values, atol=1e-2)  # stored as float16
    again = task.teacher(model, cfg, tmp_path)  # reused, not recomputed
    assert np.shares_memory(again.logprobs, again.logprobs) and len(list(tmp_path.iterdir())) == 1
    task.teacher(model, cfg.replace(temperature=1.0), tmp_path)  # another temperature: other targets
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("logits", ["cached", "live"])
def test_qd_on_a_language_model_learns_and_reports_perplexity(tmp_path, logits):
    torch.manual_seed(0)
    task = LanguageModelling(corpus(n_train=2000), seq_len=16)
    teacher = TinyLM(32)
    lm = {**TASKS["lm"], "lr": 1e-2, "batch_size": 8, "device": "cpu"}
    train(teacher, task, TrainConfig(method="fp", epochs=6, **lm))
    cfg = TrainConfig(method="qd", bits=4, bucket=32, epochs=6, teacher_logits=logits, **lm)
    torch.manual_seed(1)
    result = train(TinyLM(), task, cfg, teacher=teacher, cache_dir=tmp_path)
    assert result.test["ppl"] < 2.5  # the stream is 90 % predictable (best 1.7); uniform is 11
    assert result.val["ppl"] == task.evaluate(result.model, "val")["ppl"]
    assert [r["epoch"] for r in result.history] == list(range(1, 7)) and "val_ppl" in result.history[-1]


class Rolled(nn.Module):
    """A teacher sure of the wrong token: its model's next-token logits moved one token on."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return 5 * self.model(x).roll(1, dims=-1)


@pytest.mark.parametrize("logits", ["cached", "live"])
def test_the_teachers_targets_reach_a_language_models_step(tmp_path, logits):
    """Taught only by a teacher that names the token after the likely one, the student names it too: were
    the loop or the task to drop the teacher's top-k targets, it would learn the stream itself."""
    torch.manual_seed(0)
    task = LanguageModelling(corpus(n_train=2000), seq_len=16)
    lm = {**TASKS["lm"], "lr": 1e-2, "batch_size": 8, "device": "cpu"}
    teacher = TinyLM(32)
    train(teacher, task, TrainConfig(method="fp", epochs=4, **lm))
    wrong = Rolled(teacher)
    torch.manual_seed(1)
    result = train(TinyLM(), task, TrainConfig(method="qd", bits=4, bucket=32, epochs=4, alpha=1.0, teacher_logits=logits, **lm), teacher=wrong, cache_dir=tmp_path)
    x = torch.from_numpy(task.corpus.split("test")[:-1].astype(np.int64))[None]
    with torch.no_grad():
        student, taught = result.model.eval()(x).argmax(-1), wrong.eval()(x).argmax(-1)
    assert (student == taught).float().mean() > 0.8 and result.test["ppl"] > 4  # the stream itself: 1.7


def test_generate_is_seeded_and_greedy_follows_the_model():
    torch.manual_seed(0)
    model = TinyLM()
    a, b = generate(model, [1, 2], 10, seed=5), generate(model, [1, 2], 10, seed=5)
    assert a == b and len(a) == 12 and a[:2] == [1, 2]
    greedy = generate(model, [1], 3, temperature=0)
    with torch.no_grad():
        assert greedy[1] == int(model(torch.tensor([[1]]))[0, -1].argmax())


def test_a_model_with_fewer_embeddings_than_the_data_is_refused_before_it_runs():
    class Narrow(TinyLM):
        def forward(self, x):
            assert int(x.max()) < self.emb.num_embeddings, "ran on ids past its embeddings"
            return super().forward(x)

    model = Narrow()
    model.emb = nn.Embedding(VOCAB - 4, 16)  # the corpus holds every id up to VOCAB - 1
    with pytest.raises(QDistillError, match=f"the model embeds {VOCAB - 4} tokens, the data have a vocabulary of {VOCAB}"):
        LanguageModelling(corpus(), seq_len=8).evaluate(model, "test")


@pytest.mark.parametrize("tables", [1, 2])
def test_generate_refuses_prompt_ids_outside_the_model_vocabulary(tables):
    """One embedding table gives the vocabulary; with several (token and position), what the model predicts does."""

    class Positional(TinyLM):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(64, 16)

    model = TinyLM() if tables == 1 else Positional()
    model.train()
    for prompt, bad in (([1, VOCAB], VOCAB), ([-1, 2], -1), ([1, 2.0], 2.0)):
        with pytest.raises(QDistillError, match=f"the prompt holds token id {bad}, outside the model's vocabulary of {VOCAB}"):
            generate(model, prompt, 3)
        assert model.training  # left as it was
    assert len(generate(model, [VOCAB - 1], 3)) == 4


def lm_file(folder, vocab=300):
    """An lstm-tiny checkpoint of `vocab` tokens that says it was trained on token files with that vocabulary."""
    from qdistill.models import build_model, model_spec, save_checkpoint

    torch.manual_seed(0)
    spec = model_spec("lstm-tiny", num_classes=vocab)
    path = folder / "lm.safetensors"
    save_checkpoint(build_model(spec), spec, path, extra={"task": {"task": "lm", "vocab_size": vocab, "seq_len": 16, "corpus": "tokens"}})
    return path


def token_files(folder, top, suffix=".npy"):
    """Train, val and test ids 0 to `top` (uint16), as .npy or raw .bin."""
    paths = []
    for s in ("train", "val", "test"):
        ids = (np.arange(400) * 7 % (top + 1)).astype("<u2")
        path = folder / f"{s}{suffix}"
        np.save(path, ids) if suffix == ".npy" else path.write_bytes(ids.tobytes())
        paths.append(str(path))
    return paths


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("qdistill: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_command_line_token_ids_past_the_model_vocabulary_are_one_error(tmp_path, capsys, suffix):
    from qdistill.cli import main

    model, files = lm_file(tmp_path), token_files(tmp_path, 994, suffix)
    assert main(["eval", str(model), "--token-files", *files, "--quiet"]) == 2  # the vocabulary is the model's own
    assert f"{files[0]}: token id 994 (its largest) is outside the vocabulary [0, 300)" in one_error(capsys)
    assert main(["eval", str(model), "--token-files", *files, "--vocab-size", "1000", "--quiet"]) == 2
    assert "the model embeds 300 tokens, the data have a vocabulary of 1000" in one_error(capsys)
    distill = ["distill", "--method", "qd", "--student", "lstm-tiny", "--teacher", str(model), "--epochs", "1", "--run-dir", str(tmp_path / "run")]
    assert main([*distill, "--token-files", *files, "--vocab-size", "1000", "--seq-len", "16", "--quiet"]) == 2
    assert "the model embeds 300 tokens, the data have a vocabulary of 1000" in one_error(capsys)


def test_command_line_generate_refuses_a_tokenizer_wider_than_the_model(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from qdistill.cli import main

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 400)}}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    model, files = lm_file(tmp_path), token_files(tmp_path, 299)  # ids the model knows, from a tokenizer of 400
    argv = ["generate", str(model), "--token-files", *files, "--vocab-size", "400", "--tokenizer", str(tmp_path / "tokenizer.json"), "--tokens", "2"]
    assert main([*argv, "--prompt", "w1 w350"]) == 2
    assert "the prompt holds token id 350, outside the model's vocabulary of 300" in one_error(capsys)
    assert main([*argv, "--prompt", "w1 w299"]) == 0

import pytest
import torch
from torch import nn

from qdistill import QDistillError, UniformQuantizer, attach, detach, quantized_tensors


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, tokens):
        x = self.emb(tokens)
        x, _ = self.rnn(x)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(x))


def test_default_selection_quantizes_weights_not_biases_or_norms():
    names = [qt.name for qt in attach(Mixed(), UniformQuantizer(4))]
    assert names == ["emb.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "conv.weight", "head.weight"]


def test_forward_uses_quantized_weights_and_runs():
    model = Mixed()
    attach(model, UniformQuantizer(2, bucket=None))
    assert len(torch.unique(model.head.weight)) <= 4
    assert model(torch.randint(0, 20, (3, 6))).shape == (3, 6, 5)


def test_keep_first_and_last_layer_by_layer():
    names = [qt.name for qt in attach(Mixed(), UniformQuantizer(4), keep_first_last=True)]
    assert names == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "conv.weight"]


def test_patterns_and_types():
    assert [q.name for q in attach(Mixed(), UniformQuantizer(4), include=["rnn.*"])] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    assert [q.name for q in attach(Mixed(), UniformQuantizer(4), exclude=["rnn.*", "emb.*"])] == ["conv.weight", "head.weight"]
    assert [q.name for q in attach(Mixed(), UniformQuantizer(4), types=(nn.Linear,))] == ["head.weight"]


def test_nothing_selected_is_an_error():
    with pytest.raises(QDistillError, match="no tensor matched"):
        attach(Mixed(), UniformQuantizer(4), include=["nope*"])


def test_attach_twice_is_an_error_and_detach_restores():
    model = Mixed()
    original = model.head.weight.detach().clone()
    attach(model, UniformQuantizer(1))
    with pytest.raises(QDistillError, match="already has quantizers"):
        attach(model, UniformQuantizer(4))
    detach(model, keep_quantized=False)
    assert not quantized_tensors(model)
    assert torch.equal(model.head.weight, original)


def test_optimizer_steps_the_shadow_weights():
    model = nn.Linear(16, 4)
    attach(model, UniformQuantizer(2, bucket=None))
    shadow = model.parametrizations.weight.original
    before = shadow.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    assert not torch.equal(shadow, before)
    assert shadow.grad is not None


def test_detaching_a_copy_leaves_the_original_working():
    import copy

    model = Mixed()
    attach(model, UniformQuantizer(2))
    expected = model.head.weight.detach().clone()
    detach(copy.deepcopy(model))
    assert torch.equal(model.head.weight, expected)
    assert model(torch.randint(0, 20, (2, 3))).shape == (2, 3, 5)

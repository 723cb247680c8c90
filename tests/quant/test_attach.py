import copy

import pytest
import torch
from torch import nn

from qdistill import LearnedPointsQuantizer, QDistillError, UniformQuantizer, attach, detach, quantized_tensors


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
    torch.manual_seed(0)
    model = Mixed()
    fp = copy.deepcopy(model)
    attach(model, UniformQuantizer(2, bucket=None))
    assert len(torch.unique(model.head.weight)) <= 4
    tokens = torch.randint(0, 20, (3, 6))
    out = model(tokens)
    assert out.shape == (3, 6, 5)
    assert torch.equal(out, detach(copy.deepcopy(model))(tokens))  # every layer, the LSTM included, computes with Q(w)
    assert not torch.allclose(out, fp(tokens), atol=1e-3)


def plain_lstm_with_weights_of(lstm):
    """A plain LSTM whose tensors are `lstm`'s current ones (Q(w) where quantized)."""
    plain = nn.LSTM(lstm.input_size, lstm.hidden_size, num_layers=lstm.num_layers)
    with torch.no_grad():
        for name in plain._flat_weights_names:
            getattr(plain, name).copy_(getattr(lstm, name))
    return plain


def test_lstm_computes_with_the_current_quantized_weights_after_each_step():
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, num_layers=2)
    fp = copy.deepcopy(lstm)
    qts = attach(lstm, UniformQuantizer(2, 8))
    assert len(qts) == 4
    x = torch.randn(4, 3, 6)
    opt = torch.optim.SGD(lstm.parameters(), lr=0.5)
    out = lstm(x)[0]
    assert not torch.allclose(out, fp(x)[0], atol=1e-3)
    for _ in range(2):
        assert torch.equal(out, plain_lstm_with_weights_of(lstm)(x)[0])
        before = [getattr(lstm, qt.param).detach() for qt in qts]
        opt.zero_grad()
        out.square().sum().backward()
        opt.step()  # moves the shadows in place: an LSTM holding on to the old tensors would give the old output
        assert not all(torch.equal(b, getattr(lstm, qt.param)) for b, qt in zip(before, qts))
        new = lstm(x)[0]
        assert not torch.equal(new, out)
        out = new
    with torch.no_grad():
        assert torch.equal(lstm.eval()(x)[0], plain_lstm_with_weights_of(lstm)(x)[0])
    expected = lstm(x)[0]
    assert torch.equal(copy.deepcopy(lstm)(x)[0], expected)  # it holds this forward's Q(w), with autograd history
    assert torch.equal(lstm(x)[0], expected) and torch.equal(copy.deepcopy(lstm.float())(x)[0], expected)
    detach(lstm)
    assert torch.equal(copy.deepcopy(lstm)(x)[0], expected) and torch.equal(lstm(x)[0], expected)


def test_gpt2_conv1d_is_a_default_type_and_quantized_in_its_layout():
    """transformers' Conv1D is a Linear with its weight stored [in, out]: quantized by default, buckets along the flat tensor."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = nn.Sequential(Conv1D(12, 8), nn.ReLU(), nn.Linear(12, 3))
    assert [qt.name for qt in attach(model, UniformQuantizer(2, 12))] == ["0.weight", "2.weight"]
    rows = model[0].weight.reshape(-1, 12)  # a bucket of 12 is one stored row: 4 levels, its min and max kept
    shadow = model[0].parametrizations.weight.original.reshape(-1, 12)
    assert all(len(torch.unique(r)) <= 4 for r in rows) and torch.equal(rows.amax(1), shadow.amax(1))
    x = torch.randn(5, 8)
    assert torch.equal(model[0](x), torch.addmm(model[0].bias, x, model[0].weight))


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
    model = Mixed()
    attach(model, UniformQuantizer(2))
    expected = model.head.weight.detach().clone()
    detach(copy.deepcopy(model))
    assert torch.equal(model.head.weight, expected)
    assert model(torch.randint(0, 20, (2, 3))).shape == (2, 3, 5)


class TiedLM(nn.Module):
    """An embedding tied to the output layer, a recurrent layer between them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 8)
        self.head = nn.Linear(8, 20)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.rnn(self.emb(tokens))[0])


def occurrences(model, t):
    return sum(p is t for p in model.parameters())


@pytest.mark.parametrize("quantizer", [UniformQuantizer(2, 16), LearnedPointsQuantizer(2, 16)])
def test_a_tied_tensor_gets_one_quantizer_and_one_shadow(quantizer):
    model = TiedLM()
    shared = model.emb.weight
    qts = attach(model, quantizer)
    assert [qt.name for qt in qts] == [qt.name for qt in quantized_tensors(model)] == ["emb.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    assert [name for name, _, _ in qts[0].tied] == ["head.weight"]
    assert model.emb.parametrizations.weight[0] is model.head.parametrizations.weight[0] is qts[0].quantizer
    assert model.emb.parametrizations.weight.original is model.head.parametrizations.weight.original is shared
    assert occurrences(model, shared) == 1
    assert all(occurrences(model, p) == 1 for p in qts[0].quantizer.parameters())  # learned points: once
    assert torch.equal(model.emb.weight, model.head.weight)
    assert sum(qt.quantizer.size_bits(qt.shadow.numel()) for qt in qts) == sum(quantizer.size_bits(n) for n in (160, 256, 256))


@pytest.mark.parametrize("quantizer", [UniformQuantizer(2, 16), LearnedPointsQuantizer(2, 16)])
def test_tied_model_trains_a_step_with_gradient_from_both_uses_and_stays_tied(quantizer):
    model = TiedLM()
    attach(model, quantizer)
    shadow = model.emb.parametrizations.weight.original
    tokens = torch.randint(0, 20, (5, 3), generator=torch.Generator().manual_seed(1))
    # the same network with the two uses of Q(w) as two separate Parameters: their gradients must add up in the shadow
    untied = detach(copy.deepcopy(model))
    untied.head.weight = nn.Parameter(untied.emb.weight.detach().clone())
    untied(tokens).square().mean().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(tokens).square().mean().backward()
    for part in (untied.emb.weight.grad, untied.head.weight.grad):
        assert part.abs().sum() > 0 and not torch.allclose(shadow.grad, part)
    assert torch.allclose(shadow.grad, untied.emb.weight.grad + untied.head.weight.grad, atol=1e-7)
    before = shadow.detach().clone()
    opt.step()
    assert not torch.equal(shadow, before)
    assert torch.equal(model.emb.weight, model.head.weight) and torch.equal(model.emb.weight, model.emb.parametrizations.weight[0](shadow))


@pytest.mark.parametrize("keep_quantized", [True, False])
def test_detach_leaves_tied_modules_tied(keep_quantized):
    model = TiedLM()
    attach(model, LearnedPointsQuantizer(2, 16))
    shadow = model.emb.parametrizations.weight.original
    q = model.emb.parametrizations.weight[0]
    with torch.no_grad():
        q.points.copy_(torch.tensor([0.1, 0.4, 0.6, 0.9]))  # without 0 and 1, quantizing Q(w) again changes it
    expected = (model.emb.weight if keep_quantized else shadow).detach().clone()
    detach(model, keep_quantized=keep_quantized)
    assert not quantized_tensors(model)
    assert model.emb.weight is model.head.weight is shadow  # the optimizer's Parameter, still shared
    assert torch.equal(model.emb.weight, expected) and occurrences(model, shadow) == 1


def test_selecting_a_tied_tensor():
    def names(**kw):
        return [qt.name for qt in attach(TiedLM(), UniformQuantizer(4), **kw)]

    assert names(include=["head.*"]) == ["emb.weight"]  # one of its names is enough
    assert names(exclude=["head.*"]) == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]  # and any excludes it
    model = TiedLM()
    assert [qt.name for qt in attach(model, UniformQuantizer(4), types=(nn.Linear,))] == ["emb.weight"]
    assert torch.equal(model.emb.weight, model.head.weight)  # the embedding reads Q(w) too: it is the same tensor
    assert names(keep_first_last=True) == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]


def test_detach_in_training_mode_bakes_round_to_nearest_not_a_stochastic_draw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    attach(model, UniformQuantizer(2, 16, stochastic=True))
    model.train()  # as qd+dq leaves it after its first phase
    expected = model.eval()[0].weight.detach().clone()
    model.train()
    assert not torch.equal(model[0].weight, expected)  # a stochastic draw in training mode
    detach(model, keep_quantized=True)
    assert torch.equal(model[0].weight, expected)

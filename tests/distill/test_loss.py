import math

import pytest
import torch

from qdistill import QDistillError, distillation_loss


def test_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.5, 0.5, 0.0]])
    y = torch.tensor([0])
    T, a = 2.0, 0.7

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    ps, pt = softmax(s[0].tolist()), softmax(t[0].tolist())
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    ce = -math.log(math.exp(1) / (math.exp(1) + 1 + math.exp(-1)))
    expected = a * T * T * kl + (1 - a) * ce
    assert math.isclose(distillation_loss(s, y, t, T, a).item(), expected, rel_tol=1e-5)


def test_kl_is_batchmean_not_divided_by_classes():
    torch.manual_seed(0)
    s, t = torch.randn(4, 100), torch.randn(4, 100)
    y = torch.zeros(4, dtype=torch.long)
    kl_only = distillation_loss(s, y, t, temperature=1.0, alpha=1.0)
    ps, pt = s.log_softmax(-1), t.log_softmax(-1)
    assert torch.allclose(kl_only, (pt.exp() * (pt - ps)).sum(-1).mean())


def test_without_teacher_is_cross_entropy():
    s, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    assert torch.allclose(distillation_loss(s, y), torch.nn.functional.cross_entropy(s, y))


def test_sequences_average_over_non_padding_tokens():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    y = torch.randint(0, 7, (2, 5))
    y[1, 3:] = -100
    keep = y != -100
    full = distillation_loss(s, y, t, 2.0, 0.5)
    flat = distillation_loss(s[keep], y[keep], t[keep], 2.0, 0.5)
    assert torch.allclose(full, flat)


def test_shape_mismatch_is_named():
    with pytest.raises(QDistillError, match="differ in shape"):
        distillation_loss(torch.randn(2, 10), torch.tensor([0, 1]), torch.randn(2, 100))

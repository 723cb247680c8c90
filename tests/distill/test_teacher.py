import pytest
import torch
from torch import nn

from qdistill import CachedTeacher, LiveTeacher, QDistillError
from qdistill.distill import check_compatible


def test_cache_is_reused_and_keyed_by_weights(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Linear(6, 3), torch.randn(50, 6)
    a = CachedTeacher.build(model, x, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    assert torch.allclose(a({"index": torch.arange(4)}), model(x[:4]))
    b = CachedTeacher.build(model, x, tmp_path)
    assert torch.equal(a.logits, b.logits) and len(list(tmp_path.iterdir())) == 1
    with torch.no_grad():
        model.weight.add_(1.0)
    CachedTeacher.build(model, x, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # new weights, new entry


def test_truncated_cache_is_recomputed(tmp_path, capsys):
    model, x = nn.Linear(6, 3), torch.randn(50, 6)
    CachedTeacher.build(model, x, tmp_path)
    path = next(tmp_path.iterdir())
    path.write_bytes(path.read_bytes()[:20])
    c = CachedTeacher.build(model, x, tmp_path)
    assert c.logits.shape == (50, 3)
    assert "unreadable" in capsys.readouterr().out


def test_live_teacher_is_frozen_eval():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    live = LiveTeacher(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(3, 4)
    assert torch.equal(live({"x": x}), live({"x": x}))


def test_mismatched_teacher_and_student():
    with pytest.raises(QDistillError, match=r"teacher outputs \(2, 10\), student outputs \(2, 5\)"):
        check_compatible(nn.Linear(3, 10), nn.Linear(3, 5), {"x": torch.randn(2, 3)})

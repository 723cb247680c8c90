import copy

import pytest
import torch

from qdistill import METHODS, QDistillError, TrainConfig, quantized_tensors, train
from qdistill.quant import LearnedPointsQuantizer, UniformQuantizer
from qdistill.train import evaluate
from tests.conftest import toy_dataset, toy_net


@pytest.fixture(scope="module")
def data():
    return toy_dataset()


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(0)
    model = toy_net()
    train(model, data, TrainConfig(method="fp", epochs=3, batch_size=64), quiet=True)
    return model


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("ptq", "dq")])
def test_every_trained_method_learns_and_reports_the_quantized_model(method, data, teacher):
    torch.manual_seed(1)
    cfg = TrainConfig(method=method, bits=2, epochs=3, batch_size=64)
    result = train(toy_net(), data, cfg, teacher=copy.deepcopy(teacher), quiet=True)
    assert result.test_acc > 80  # chance is 25
    assert result.test_acc == evaluate(result.model, data.test_x, data.test_y)
    quantized = quantized_tensors(result.model)
    if METHODS[method].quantizer is None:
        assert not quantized
    else:
        kind = LearnedPointsQuantizer if METHODS[method].then == "dq" else UniformQuantizer
        assert quantized and all(isinstance(qt.quantizer, kind) for qt in quantized)
        for qt in quantized:
            assert len(torch.unique(getattr(qt.module, qt.param))) <= 4 * qt.quantizer.n_buckets(qt.shadow.numel())
    assert len(result.history) == cfg.epochs + (cfg.dq_epochs if METHODS[method].then else 0)


def test_ptq_and_dq_start_from_trained_weights(data, teacher):
    ptq = train(copy.deepcopy(teacher), data, TrainConfig(method="ptq", bits=4), quiet=True)
    assert ptq.train_seconds == 0 and ptq.test_acc > 80
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = copy.deepcopy(teacher)
    dq = train(student, data, TrainConfig(method="dq", bits=2, dq_epochs=2, dq_teacher="self", redistribute=True), quiet=True)
    assert dq.test_acc > 80
    points = [qt.quantizer.points.numel() for qt in quantized_tensors(dq.model)]
    assert sum(points) == 2 * 4
    for qt in quantized_tensors(dq.model):  # weights frozen: the shadows are the teacher's weights
        assert torch.equal(qt.shadow, before[qt.name])


def test_batchnorm_statistics_come_from_quantized_weights(data):
    torch.manual_seed(0)
    model = toy_net()
    model[1].momentum = None  # running mean = plain average of the batch means
    cfg = TrainConfig(method="qat", bits=1, bucket=None, epochs=1, batch_size=64, lr=1e-6, momentum=0.0, weight_decay=0.0, schedule="constant")
    result = train(model, data, cfg, quiet=True)
    conv = result.model[0]
    with torch.no_grad():
        quantized_mean = conv(data.train_x).mean((0, 2, 3))
        fp_mean = torch.nn.functional.conv2d(data.train_x, conv.parametrizations.weight.original, padding=1).mean((0, 2, 3))
    running = result.model[1].running_mean
    assert torch.allclose(running, quantized_mean, atol=1e-3)
    assert not torch.allclose(running, fp_mean, atol=0.05)


@pytest.mark.parametrize("layout, channels_last", [("channels_last", True), ("contiguous", False), ("auto", True)])  # auto: CPU
def test_memory_format_reaches_shadow_and_quantized_weights(data, layout, channels_last):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*toy_net()[:3], torch.nn.Conv2d(8, 8, 3, padding=1), *toy_net()[3:])
    result = train(model, data, TrainConfig(method="qat", bits=2, epochs=1, batch_size=64, memory_format=layout, device="cpu"), quiet=True)
    conv = result.model[3]
    for w in (conv.weight, conv.parametrizations.weight.original):
        assert w.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert result.test_acc > 80


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_grad_clip_bounds_each_step(data, clip):
    torch.manual_seed(0)
    model = toy_net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(method="qat", bits=2, epochs=1, batch_size=64, lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant", grad_clip=clip)
    train(model, data, cfg, quiet=True)
    after = {n.replace(".parametrizations.weight.original", ".weight"): p.detach() for n, p in model.named_parameters()}  # the shadows
    steps = -(-len(data.train_x) // cfg.batch_size)
    moved = torch.cat([(after[n] - before[n]).flatten() for n in before]).norm().item()
    assert (moved <= steps * 1e-3 * 1.001) == (clip is not None)


def test_distilling_methods_need_a_teacher(data):
    with pytest.raises(QDistillError, match="needs a teacher"):
        train(toy_net(), data, TrainConfig(method="qd"), quiet=True)


def test_mismatched_teacher(data):
    with pytest.raises(QDistillError, match="teacher and student do not match"):
        train(toy_net(), data, TrainConfig(method="kd"), teacher=toy_net(classes=7), quiet=True)

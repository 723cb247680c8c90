import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from qdistill import LearnedPointsQuantizer, UniformQuantizer, attach, quantized_tensors
from qdistill.quant.fused import fusable_groups, fused_quantization


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 36, 33), nn.ReLU(), nn.Linear(33, 5),
    )  # fmt: skip


def loss_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out, [qt.shadow.grad.clone() for qt in quantized_tensors(model)]


@pytest.mark.parametrize("quantizer", [UniformQuantizer(2, 256), UniformQuantizer(4, 100, scale="mse"), UniformQuantizer(3, 7)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fused_forward_and_gradients_are_those_of_the_per_tensor_path(quantizer, layout):
    plain = net().to(memory_format=layout)
    attach(plain, quantizer)
    fused = copy.deepcopy(plain)
    x = torch.randn(4, 3, 6, 6)
    with fused_quantization(fused, enabled=True):
        assert len(fusable_groups(fused)) == 1
        for _ in range(2):  # the second forward sees the weights after a step
            (out_a, grads_a), (out_b, grads_b) = loss_and_grads(plain, x), loss_and_grads(fused, x)
            assert torch.equal(out_a, out_b)
            assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
            for model in (plain, fused):
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
        assert all(qt.quantizer.fused is None for qt in quantized_tensors(fused))  # only for the length of a forward


def test_eval_mode_and_reads_outside_a_forward_take_the_per_tensor_path():
    model = net()
    attach(model, UniformQuantizer(2, 64))
    with fused_quantization(model, enabled=True):
        model.eval()
        model(torch.randn(2, 3, 6, 6))
        assert model[0].parametrizations.weight[0].fused is None
        assert torch.equal(model[0].weight, UniformQuantizer(2, 64).quantize(model[0].parametrizations.weight.original))


def test_fused_outputs_are_cleared_when_the_forward_fails():
    model = net()
    attach(model, UniformQuantizer(2, 64))
    with fused_quantization(model, enabled=True), pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 5, 5))  # wrong size for the first linear layer
    assert all(qt.quantizer.fused is None for qt in quantized_tensors(model))
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_only_bucketed_uniform_tensors_with_equal_settings_are_grouped():
    for quantizer in (UniformQuantizer(2, None), LearnedPointsQuantizer(2, 64)):
        model = net()
        attach(model, quantizer)
        assert fusable_groups(model) == []
    model = net()
    attach(model, UniformQuantizer(2, 64), include=["0.*", "3.*"])
    parametrize.register_parametrization(model[8], "weight", UniformQuantizer(4, 64))  # alone with its settings
    assert [[qt.name for qt in g.tensors] for g in fusable_groups(model)] == [["0.weight", "3.weight"]]


def test_by_default_tensors_on_a_cpu_keep_the_per_tensor_path():
    model = net()
    attach(model, UniformQuantizer(2, 64))
    with fused_quantization(model):
        assert not model._forward_pre_hooks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_half_precision_is_the_per_tensor_path(dtype):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 7)).to(dtype)
    with torch.no_grad():
        plain[0].weight[0] = 0.5  # a constant bucket: NaN if quantized in fp16
        plain[2].weight[0, :16] = torch.linspace(0, 1e-3, 16)  # a narrow one: inf
    attach(plain, UniformQuantizer(8, 16))
    fused = copy.deepcopy(plain)
    x = torch.randn(4, 12).to(dtype)
    with fused_quantization(fused, enabled=True):
        (out_a, grads_a), (out_b, grads_b) = loss_and_grads(plain, x), loss_and_grads(fused, x)
    assert out_a.isfinite().all() and torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_a_tied_tensor_is_fused_once():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    plain[4].weight = plain[0].weight
    attach(plain, UniformQuantizer(2, 64))
    fused = copy.deepcopy(plain)
    x = torch.randn(4, 16)
    with fused_quantization(fused, enabled=True):
        assert [[qt.name for qt in g.tensors] for g in fusable_groups(fused)] == [["0.weight", "2.weight"]]
        (out_a, grads_a), (out_b, grads_b) = loss_and_grads(plain, x), loss_and_grads(fused, x)
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize(
    "quantizer",
    [UniformQuantizer(2, 16, groups="row"), UniformQuantizer(3, 7, groups="row", zero_point="int", scale_dtype="bfloat16"), UniformQuantizer(4, 100, scale="mse", zero_point="int", scale_dtype="float16")],
)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fused_kernel_ready_options_are_those_of_the_per_tensor_path(quantizer, layout):
    test_fused_forward_and_gradients_are_those_of_the_per_tensor_path(quantizer, layout)


def test_only_equal_kernel_ready_options_are_grouped():
    model = net()
    attach(model, UniformQuantizer(2, 64), include=["0.*", "3.*"])
    parametrize.register_parametrization(model[6], "weight", UniformQuantizer(2, 64, groups="row"))
    parametrize.register_parametrization(model[8], "weight", UniformQuantizer(2, 64, scale_dtype="float16"))
    assert [[qt.name for qt in g.tensors] for g in fusable_groups(model)] == [["0.weight", "3.weight"]]

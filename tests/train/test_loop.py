import copy

import pytest
import torch

from qdistill import METHODS, QDistillError, TrainConfig, detach, quantized_tensors, train
from qdistill.errors import Diverged
from qdistill.quant import LearnedPointsQuantizer, UniformQuantizer
from qdistill.train.loop import Phase, make_optimizer, make_schedule
from tests.conftest import toy_dataset, toy_net


@pytest.fixture(scope="module")
def data():
    return toy_dataset()


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(0)
    model = toy_net()
    train(model, data, TrainConfig(method="fp", epochs=3, batch_size=64))
    return model


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("ptq", "dq")])
def test_every_trained_method_learns_and_reports_the_quantized_model(method, data, teacher):
    torch.manual_seed(1)
    cfg = TrainConfig(method=method, bits=2, epochs=3, batch_size=64)
    result = train(toy_net(), data, cfg, teacher=copy.deepcopy(teacher))
    assert result.test_acc > 80  # chance is 25
    shipped = detach(copy.deepcopy(result.model), keep_quantized=True).eval()  # plain weights, no parametrization
    with torch.no_grad():
        hits = (shipped(data.test_x).argmax(-1) == data.test_y).sum().item()
    assert result.test_acc == 100 * hits / len(data.test_y)  # the accuracy reported is the quantized model's
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
    ptq = train(copy.deepcopy(teacher), data, TrainConfig(method="ptq", bits=4))
    assert ptq.train_seconds == 0 and ptq.test_acc > 80
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = copy.deepcopy(teacher)
    dq = train(student, data, TrainConfig(method="dq", bits=2, dq_epochs=2, dq_teacher="self", redistribute=True))
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
    result = train(model, data, cfg)
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
    result = train(model, data, TrainConfig(method="qat", bits=2, epochs=1, batch_size=64, memory_format=layout, device="cpu"))
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
    train(model, data, cfg)
    after = {n.replace(".parametrizations.weight.original", ".weight"): p.detach() for n, p in model.named_parameters()}  # the shadows
    steps = -(-len(data.train_x) // cfg.batch_size)
    moved = torch.cat([(after[n] - before[n]).flatten() for n in before]).norm().item()
    assert (moved <= steps * 1e-3 * 1.001) == (clip is not None)


def test_distilling_methods_need_a_teacher(data):
    with pytest.raises(QDistillError, match="needs a teacher"):
        train(toy_net(), data, TrainConfig(method="qd"))


def test_mismatched_teacher(data):
    with pytest.raises(QDistillError, match="teacher and student do not match"):
        train(toy_net(), data, TrainConfig(method="kd"), teacher=toy_net(classes=7))


def test_momentum_zero_trains_without_momentum():
    """OneCycleLR cycles momentum unless told not to, overriding the configured value every step."""
    model = toy_net()
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt = make_optimizer(Phase("fp", list(model.parameters()), 1, 0.1, "sgd", momentum=0.0, weight_decay=0.0))
    schedule = make_schedule(opt, "onecycle", 10)
    for _ in range(3):
        opt.step(), schedule.step()
        assert opt.param_groups[0]["momentum"] == 0.0 and not opt.state_dict()["state"]  # no momentum buffers


def test_validation_split_is_the_last_training_examples_and_is_what_epochs_report(data):
    held = data.holdout(100)
    assert torch.equal(held.val_x, data.train_x[-100:]) and len(held.train_x) == len(data.train_x) - 100
    assert torch.equal(held.holdout(0).train_x, held.train_x)
    with pytest.raises(QDistillError, match="already has a validation split"):
        held.holdout(10)
    records = []
    result = train(toy_net(), held, TrainConfig(method="fp", epochs=2, batch_size=64), log=records.append)
    epochs = [r for r in records if "val_acc" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and epochs[-1]["val_acc"] == result.val_acc
    assert not any("test_acc" in r for r in records)  # the test split is for the final result only
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 2 * 7 + 1))  # a loss per step: 412 examples in batches of 64 -> 7 steps an epoch


def test_final_eval_off_leaves_the_metrics_to_the_caller(data, monkeypatch):
    from qdistill.tasks import ImageClassification

    scored = []
    monkeypatch.setattr(ImageClassification, "evaluate", lambda self, model, split: scored.append(split) or {"acc": 0.0})
    result = train(toy_net(), data.holdout(100), TrainConfig(method="fp", epochs=1, batch_size=64), final_eval=False)
    assert scored == ["val"] and result.test == {} and result.val is None  # only the epoch's own validation ran
    train(toy_net(), data.holdout(100), TrainConfig(method="fp", epochs=1, batch_size=64))
    assert scored == ["val", "val", "val", "test"]


class Exploding(torch.nn.Module):
    """A model whose output is multiplied by `scale` in every training forward after the `after`-th (or,
    with `once`, in the `after`-th only): a stand-in for a run that diverges."""

    def __init__(self, after, scale=float("inf"), once=False):
        super().__init__()
        self.net, self.after, self.scale, self.once, self.calls = toy_net(), after, scale, once, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if (self.calls == self.after) if self.once else (self.calls > self.after):
                out = out * self.scale
        return out


def test_guard_stops_at_the_step_the_loss_became_nan(data):
    with pytest.raises(Diverged, match="step 21 .*not finite") as e:
        train(Exploding(after=20), data, TrainConfig(method="qat", bits=2, epochs=5, batch_size=64))
    assert (e.value.phase, e.value.step) == ("qat 2b", 21)


def test_guard_ratio_test_and_off(data):
    def spike():
        return Exploding(after=30, scale=-100.0, once=True)  # confidently wrong once: a large but finite spike

    with pytest.raises(Diverged, match="step 30 .*running median"):
        train(spike(), data, TrainConfig(method="fp", epochs=5, batch_size=64))
    train(spike(), data, TrainConfig(method="fp", epochs=5, batch_size=64, guard_factor=None))  # no ratio test
    train(Exploding(after=20), data, TrainConfig(method="fp", epochs=1, batch_size=64, guard="off"))


def test_guard_rollback_returns_to_the_last_good_state_and_clips(data):
    records = []
    torch.manual_seed(0)
    result = train(Exploding(after=40, scale=float("nan"), once=True), data, TrainConfig(method="qd", bits=2, epochs=8, batch_size=64, guard="rollback"), teacher=toy_net(), log=records.append)
    rollback = [r for r in records if "rollback_to" in r]
    assert len(rollback) == 1 and rollback[0]["diverged_at"] == 40 and rollback[0]["rollback_to"] == 32 and rollback[0]["grad_clip"] == 1.0
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 8 * 8 + 1))  # steps 33 to 40 are redone after the rollback, and logged once
    assert result.test_acc > 80


def test_each_rollback_halves_the_clip_and_the_last_raises(data):
    """A replay with the same clip would diverge the same way: each rollback changes it."""
    records = []
    with pytest.raises(Diverged):
        train(Exploding(after=20), data, TrainConfig(method="qat", bits=2, epochs=8, batch_size=64, guard="rollback"), log=records.append)
    assert [r["grad_clip"] for r in records if "rollback_to" in r] == [1.0, 0.5, 0.25]


def test_guard_ratio_test_ignores_a_median_of_zero():
    from qdistill.train.guard import DivergenceGuard

    guard = DivergenceGuard("p", factor=10.0)
    for step in range(1, 41):
        guard.add(torch.tensor(0.0 if step < 40 else 1e-3))  # a memorized subset, then a tiny loss
    assert len(guard.check(40)) == 40


def test_momentum_is_sgds_and_adamws_beta1():
    """--momentum is never silently ignored: SGD's momentum (Nesterov), AdamW's first-moment decay."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = make_optimizer(Phase("fp", params, 1, 0.1, "sgd", momentum=0.5, weight_decay=0.0)).param_groups[0]
    adamw = make_optimizer(Phase("fp", params, 1, 0.1, "adamw", momentum=0.5, weight_decay=0.0)).param_groups[0]
    assert (sgd["momentum"], sgd["nesterov"], adamw["betas"]) == (0.5, True, (0.5, 0.999))


def test_a_student_with_no_trainable_weights_gets_one_clear_error():
    data, student = toy_dataset(), toy_net()
    student.requires_grad_(False)
    with pytest.raises(QDistillError, match="no trainable weights"):
        train(student, data, TrainConfig(method="qat", bits=4, epochs=1))


class Rolled(torch.nn.Module):
    """A teacher that is sure of the wrong class: its model's logits moved one class on."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return 5 * self.model(x).roll(1, dims=-1)


@pytest.mark.parametrize("method, logits", [("kd", "cached"), ("qd", "cached"), ("qd", "live")])
def test_the_teachers_targets_reach_the_step(method, logits, data, teacher):
    """Taught only by a teacher that names the next class, the student learns to name it too: were the
    loop to drop the teacher's targets, it would learn the true labels instead."""
    torch.manual_seed(1)
    cfg = TrainConfig(method=method, bits=4, epochs=3, batch_size=64, alpha=1.0, teacher_logits=logits)
    wrong = Rolled(copy.deepcopy(teacher))
    result = train(toy_net(), data, cfg, teacher=wrong)
    with torch.no_grad():
        student, taught = result.model.eval()(data.test_x).argmax(-1), wrong.eval()(data.test_x).argmax(-1)
    assert (student == taught).float().mean() > 0.8 and result.test_acc < 20


def test_probing_gradient_norms_changes_no_batchnorm_statistics(data, teacher):
    """The point-redistribution probe runs batches through the model: in eval mode, and the mode restored."""
    from qdistill.tasks import as_task
    from qdistill.train.loop import gradient_norms

    model = copy.deepcopy(teacher).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms = gradient_norms(model, [p for p in model.parameters()], as_task(data), None, TrainConfig(method="qat", batch_size=64))
    assert all(n > 0 for n in norms) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_rollback_point_shares_no_memory_with_the_run(data):
    """A copy in CPU memory (where the GPU test below checks it is kept), not a view of what the step changes."""
    from qdistill.train.state import capture

    model = toy_net()
    opt = torch.optim.AdamW(model.parameters())
    model(data.train_x[:8]).sum().backward()
    opt.step()
    state = capture(model, opt, make_schedule(opt, "constant", 10), {"step": 1})
    tensors = [*state["model"].values(), *(v for s in state["optimizer"]["state"].values() for v in s.values())]
    live = {t.untyped_storage().data_ptr() for t in [*model.state_dict().values(), *(v for s in opt.state.values() for v in s.values())]}
    assert len(tensors) > 10 and all(t.device.type == "cpu" and t.untyped_storage().data_ptr() not in live for t in tensors)


def test_the_rollback_point_is_copied_out_of_the_training_device():
    """Without a GPU: a model on the meta device, which holds no values, cannot be copied into CPU memory,
    so taking its rollback point fails there (a copy left on the device would not)."""
    from qdistill.train.state import capture

    model = toy_net().to("meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NotImplementedError, match="meta"):
        capture(model, opt, make_schedule(opt, "constant", 10), {"step": 1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_rollback_point_of_a_gpu_run_is_in_cpu_memory(data):
    from qdistill.train.state import capture, restore

    model = toy_net().cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(data.train_x[:8].cuda()).sum().backward()
    opt.step()
    schedule = make_schedule(opt, "constant", 10)
    state = capture(model, opt, schedule, {"step": 1})
    assert all(t.device.type == "cpu" for t in state["model"].values())
    assert all(v.device.type == "cpu" for s in state["optimizer"]["state"].values() for v in s.values())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    opt.step()
    restore(state, model, opt, schedule)
    assert all(torch.equal(expected[k], v) and v.is_cuda for k, v in model.state_dict().items())

"""Training-step speed ratios, measured in one process (ratios travel between machines, seconds don't).

  qd (cached teacher logits) / fp      the cost of quantizing + distilling; goal <= 1.10
  qd with scale=mse / fp               the same with the clipped-range search (an accuracy option)
  dq / qd                              learned points vs uniform quantizer; goal <= 1.30
  qd live teacher / qd cached logits   what the logit cache saves
  ours / torchao 0.18 QAT, 4 bits      fake-quant step on the same MLP; goal: ours no slower

Median of `--steps` timed steps after warm-up. Writes bench/results/speed-<device>.json and .md.
    python bench/speed.py [--steps 30] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from qdistill import LearnedPointsQuantizer, TrainConfig, UniformQuantizer, attach, distillation_loss, quantized_tensors
from qdistill.distill import CachedTeacher, LiveTeacher
from qdistill.models import build_model, model_spec
from qdistill.quant import fused_quantization

RESULTS = Path(__file__).parent / "results"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Stepper:
    """One configuration's training step: forward (quantized), loss, backward, SGD step, quantizer hook."""

    def __init__(self, model, params, x, y, teacher):
        self.model, self.x, self.y, self.teacher = model, x, y, teacher
        self.fused = contextlib.ExitStack()  # quantize as the training loop does: grouped, for this stepper's life
        self.fused.enter_context(fused_quantization(model))
        self.opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, nesterov=True)
        self.quantizers = [qt.quantizer for qt in quantized_tensors(model)]
        self.batch = {"x": x, "y": y, "index": torch.arange(len(x), device=x.device)}
        self.times: list[float] = []

    def step(self, record: bool = True) -> None:
        sync(self.x.device)
        start = time.perf_counter()
        out = self.model(self.x)
        loss = distillation_loss(out, self.y, self.teacher(self.batch) if self.teacher else None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        for q in self.quantizers:
            q.after_step(self.opt)
        sync(self.x.device)
        if record:
            self.times.append(time.perf_counter() - start)


def median_times(steppers: dict[str, Stepper], steps: int, burst: int = 5, warmup: int = 3) -> dict[str, float]:
    """Median step seconds per configuration, the configurations taking turns every `burst` steps so that
    drift in the machine's speed (other load, clocks) hits all alike."""
    for s in steppers.values():
        for _ in range(warmup):
            s.step(record=False)
    for _ in range(max(1, steps // burst)):
        for s in steppers.values():
            for _ in range(burst):
                s.step()
    return {name: statistics.median(s.times) for name, s in steppers.items()}


def student_ratios(preset: str, device, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    teacher_model = build_model(model_spec("resnet-small")).to(device)
    cached = CachedTeacher(LiveTeacher(teacher_model)({"x": x}))
    base = build_model(model_spec(preset)).to(device, memory_format=TrainConfig().torch_memory_format(device))  # as the loop has it

    def stepper(quantizer, teacher, frozen=False):
        model = copy.deepcopy(base)
        if quantizer is not None:
            attach(model, quantizer)
        if frozen:  # dq: weights frozen, only the points train
            model.requires_grad_(False)
            params = [qt.quantizer.points.requires_grad_(True) for qt in quantized_tensors(model)]
        else:
            params = [p for p in model.parameters() if p.requires_grad]
        return Stepper(model, params, x, y, teacher)

    t = median_times(
        {
            "fp": stepper(None, None),
            "qd": stepper(UniformQuantizer(4, 256), cached),
            "qd_mse": stepper(UniformQuantizer(4, 256, scale="mse"), cached),
            "dq": stepper(LearnedPointsQuantizer(4, 256), cached, frozen=True),
            "live": stepper(UniformQuantizer(4, 256), LiveTeacher(teacher_model)),
        },
        steps,
    )
    fp, qd, qd_mse, dq, live = t["fp"], t["qd"], t["qd_mse"], t["dq"], t["live"]
    return {
        "student": preset,
        "batch": batch,
        "fp_ms": 1e3 * fp,
        "qd_ms": 1e3 * qd,
        "dq_ms": 1e3 * dq,
        "qd_live_ms": 1e3 * live,
        "qd_mse_ms": 1e3 * qd_mse,
        "qd_cached_over_fp": qd / fp,
        "qd_mse_over_fp": qd_mse / fp,
        "dq_over_qd": dq / qd,
        "live_over_cached": live / qd,
    }


def torchao_ratio(device, batch: int, steps: int) -> dict:
    """Ours vs torchao's QAT fake quantization: int4 asymmetric, groups of 256 (our bucket), same MLP."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256)).to(device)
    x = torch.randn(batch, 1024, device=device)
    y = torch.randint(0, 256, (batch,), device=device)
    ours = copy.deepcopy(mlp)
    attach(ours, UniformQuantizer(4, 256))
    theirs = copy.deepcopy(mlp)
    quantize_(theirs, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=256, is_symmetric=False), step="prepare"))
    t = median_times(
        {name: Stepper(m, list(m.parameters()), x, y, None) for name, m in (("ours", ours), ("torchao", theirs), ("fp", mlp))}, steps
    )
    t_ours, t_theirs, t_fp = t["ours"], t["torchao"], t["fp"]
    return {"mlp": "1024-1024-1024-256", "batch": batch, "ours_ms": 1e3 * t_ours, "torchao_ms": 1e3 * t_theirs, "fp_ms": 1e3 * t_fp, "ours_over_torchao": t_ours / t_theirs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--students", nargs="+", default=["tiny", "medium"])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = [student_ratios(s, device, args.batch, args.steps) for s in args.students]
    ao = torchao_ratio(device, 256, args.steps)
    layout = TrainConfig().torch_memory_format(device)
    result = {"device": card, "torch": torch.__version__, "steps": args.steps, "layout": str(layout), "students": rows, "torchao": ao}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if device.type == "cuda" else "cpu"
    (args.out / f"speed-{tag}.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Training-step speed on {card}",
        "",
        f"Median of {args.steps} steps per configuration (taking turns every 5 steps), batch {args.batch}, students in {layout} (the loop's default here), torch {torch.__version__}. Ratios, lower is better.",
        "",
        "| student | fp ms | qd ms | dq ms | qd live ms | qd mse ms | qd cached / fp (goal <= 1.10) | dq / qd (goal <= 1.30) | live / cached | qd mse / fp |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['student']} | {r['fp_ms']:.1f} | {r['qd_ms']:.1f} | {r['dq_ms']:.1f} | {r['qd_live_ms']:.1f} | {r['qd_mse_ms']:.1f} | "
            f"{r['qd_cached_over_fp']:.3f} | {r['dq_over_qd']:.3f} | {r['live_over_cached']:.2f} | {r['qd_mse_over_fp']:.3f} |"
            for r in rows
        ],
        "",
        f"Fake-quant training step, MLP {ao['mlp']}, batch {ao['batch']}, int4 asymmetric, groups of 256: "
        f"qdistill {ao['ours_ms']:.2f} ms, torchao 0.18 QAT {ao['torchao_ms']:.2f} ms, unquantized {ao['fp_ms']:.2f} ms; "
        f"ours / torchao = **{ao['ours_over_torchao']:.3f}** (goal <= 1.0).",
        "",
    ]
    (args.out / f"speed-{tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Smoke versions of the benchmarks: tiny sizes, a couple of steps; the numbers themselves are not checked."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parent.parent / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_speed_student_ratios():
    speed = load("speed")
    row = speed.student_ratios("tiny", torch.device("cpu"), batch=4, steps=1)
    for key in ("qd_cached_over_fp", "dq_over_qd", "live_over_cached"):
        assert row[key] > 0


def test_speed_against_torchao():
    pytest.importorskip("torchao")
    speed = load("speed")
    row = speed.torchao_ratio(torch.device("cpu"), batch=4, steps=1)
    assert row["ours_over_torchao"] > 0

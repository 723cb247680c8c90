"""torchrun: two gloo processes train as one process with the same global batch, replicated (DDP) or
sharded (FSDP2), and a run killed under torchrun resumes in one process (the checkpoint holds the
global state)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qdistill.train import distributed
from tests.conftest import KILLING_HOOK

# The two runs differ only in how the batch's mean gradient is summed (two half-batch means averaged,
# against one mean), so the shadow weights drift apart by float rounding: after 34 steps the stored
# levels are the same and the float tensors (scales, biases) agree to TOLERANCE.
TOLERANCE = 1e-6

# The toy data as a hook that can kill rank 0 at a step (conftest.KILLING_HOOK): 513 examples, of which the
# last 30 are the validation split (evaluated each epoch), so the last batch of 30 holds 3, split 2 and 1
# (the ranks' losses are weighted by the examples they hold).
HOOK_DATA = "toy_dataset(n_train=513)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    root = os.getcwd()
    (tmp / "hook.py").write_text(KILLING_HOOK.format(root=root, imports="from tests.conftest import toy_dataset", data=HOOK_DATA))
    from qdistill.models import save_checkpoint
    from tests.conftest import toy_mlp

    torch.manual_seed(0)
    save_checkpoint(toy_mlp(), {"factory": "tests.conftest:toy_mlp", "kwargs": {}}, tmp / "teacher.safetensors")
    env = {**os.environ, "PYTHONPATH": f"{tmp}:{root}", "QDISTILL_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    argv = ["distill", "--method", "qd", "--bits", "4", "--student", "tests.conftest:toy_mlp", "--teacher", str(tmp / "teacher.safetensors"),
            "--teacher-model", "tests.conftest:toy_mlp", "--epochs", "2", "--batch-size", "30", "--checkpoint-steps", "5", "--dataset", "hook:data", "--val-size", "30", "--quiet"]
    return tmp, root, env, argv


def qdistill(setup, *argv, processes=1, kill_at=None):
    tmp, root, env, _ = setup
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable]
    env = {**env, "KILL_AT": str(kill_at or -1)}
    return subprocess.run([*launcher, "-m", "qdistill", *argv], env=env, cwd=root, capture_output=True, text=True, timeout=300)


def packed(run_dir):
    row = json.loads((run_dir / "results.json").read_text())["rows"][0]
    return load_file(run_dir / row["file"])


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def assert_same_model(a, b):
    assert a.keys() == b.keys()
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=TOLERANCE, msg=name)
        else:
            assert torch.equal(a[name], b[name]), name  # the packed levels: the same model is shipped


@pytest.fixture(scope="module")
def single(setup):
    tmp, *_, argv = setup
    result = qdistill(setup, *argv, "--run-dir", str(tmp / "one"))
    assert result.returncode == 0, result.stderr
    return tmp / "one"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_train_as_one(setup, single, parallel):
    """With FSDP2 each rank holds half of every weight: the levels are still the one-process run's, so
    each bucket's range was taken over the full tensor (the last layer's 4x32 weight is one bucket of
    128, split 64 and 64 between the ranks)."""
    tmp, *_, argv = setup
    run = tmp / f"two-{parallel}"
    result = qdistill(setup, *argv, "--parallel", parallel, "--guard", "rollback", "--run-dir", str(run), processes=2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model saved to") == 1  # rank 0 alone reports and writes
    assert_same_model(packed(single), packed(run))
    meta = json.loads(packed_metadata(run))
    names = [e["name"] for e in meta["quantized"] + meta["kept"]]
    assert names and not any(name.startswith("module.") for name in names)  # the model's own names, not DDP's
    one, two = losses(single), losses(run)
    assert len(one) == len(two) == 2 * 17  # each step logged once: 17 steps per epoch
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=0, atol=TOLERANCE)


def packed_metadata(run_dir):
    from safetensors import safe_open

    row = json.loads((run_dir / "results.json").read_text())["rows"][0]
    with safe_open(run_dir / row["file"], "pt") as f:
        return f.metadata()["qdistill"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_killed_under_torchrun_resumes_in_one_process(setup, single, parallel):
    """The checkpoint holds the whole state (gathered from the shards under FSDP2), so one process resumes it."""
    tmp, *_, argv = setup
    run = tmp / f"killed-{parallel}"
    killed = qdistill(setup, *argv, "--parallel", parallel, "--run-dir", str(run), processes=2, kill_at=22)  # 2 steps after the save at 20
    assert killed.returncode != 0 and (run / "state.pt").exists() and not (run / "results.json").exists()
    saved = torch.load(run / "state.pt", weights_only=True)["current"]
    assert saved["loop"]["step"] == 20 and saved.get("full", False) == (parallel == "fsdp")  # fsdp: gathered from the ranks' shards
    resumed = qdistill(setup, "distill", "--resume", str(run), "--trust-code")  # the run names factories of its own
    assert resumed.returncode == 0, resumed.stderr
    assert_same_model(packed(single), packed(run))
    assert len(losses(run)) == 2 * 17  # the steps after the save were logged once, by the resumed run


def test_learned_points_are_reduced_like_weights(setup):
    """qd+dq: after qd, a phase that trains only the learned points (DDP then wraps those alone)."""
    tmp, *_, argv = setup
    argv = [a if a != "qd" else "qd+dq" for a in argv] + ["--dq-epochs", "1"]
    runs = [tmp / "dq-one", tmp / "dq-two"]
    for run, processes in zip(runs, (1, 2)):
        result = qdistill(setup, *argv, "--run-dir", str(run), processes=processes)
        assert result.returncode == 0, result.stderr
    a, b = (packed(run) for run in runs)
    assert "points" in a
    assert_same_model(a, b)


def test_fsdp_refuses_learned_points():
    from qdistill import QDistillError, TrainConfig

    with pytest.raises(QDistillError, match="use parallel ddp"):
        TrainConfig(method="qd+dq", parallel="fsdp")


def test_other_commands_refuse_torchrun(monkeypatch, capsys):
    from qdistill.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["inspect", "x.safetensors"]) == 2
    assert "only distill and train-teacher run under torchrun" in capsys.readouterr().err


def test_one_process_is_untouched():
    batch = {"x": torch.arange(6.0), "index": torch.arange(6)}
    assert distributed.shard(batch) == (batch, 6) and distributed.loss_weight(6, 6) == 1.0
    assert not distributed.active() and distributed.is_main() and distributed.world() == 1


def test_each_rank_takes_its_own_slice(monkeypatch):
    """Rank r of w takes the r-th of w near-equal slices (the union is the batch); a rank left without an
    example runs a stand-in that counts for nothing."""
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world", lambda: 3)
    batch = {"x": torch.arange(7.0) * 10, "index": torch.arange(7)}
    slices, averaged = [], 0.0
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        mine, rows = distributed.shard(batch)
        assert rows == len(mine["x"]) and torch.equal(mine["x"], mine["index"] * 10.0)
        slices.append(mine["index"])
        averaged += distributed.loss_weight(rows, 7) * mine["x"].mean().item() / 3  # DDP averages the ranks' weighted mean losses' gradients
    assert torch.equal(torch.cat(slices), batch["index"])
    assert averaged == pytest.approx(batch["x"].mean().item())  # ... which is the global batch's mean
    monkeypatch.setattr(distributed, "rank", lambda: 2)
    mine, rows = distributed.shard({"x": torch.ones(2), "index": torch.arange(2)})
    assert rows == 0 and len(mine["x"]) == 1 and distributed.loss_weight(rows, 2) == 0


def test_a_bad_input_under_torchrun_is_one_error_line_not_a_hang(setup):
    """Rank 0 prepares the data first; when that fails the other rank raises its error instead of waiting."""
    tmp, *_, argv = setup
    result = qdistill(setup, *[a if a != "hook:data" else "nosuchmodule:data" for a in argv], "--run-dir", str(tmp / "bad"), processes=2)
    assert result.returncode != 0
    assert result.stderr.count("qdistill: error:") == 1 and "cannot import dataset module 'nosuchmodule'" in result.stderr

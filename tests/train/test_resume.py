"""A run killed with SIGKILL and resumed ends with the weights of the same run uninterrupted, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from qdistill import QDistillError
from qdistill.cli import main
from qdistill.train.state import Checkpoint
from tests.conftest import KILLING_HOOK

# Trains qd+dq (two phases) on the toy data with a checkpoint every 3 steps; with KILL_AT=phase:step it
# SIGKILLs itself when that step is logged, as a kill from outside would, with nothing flushed or closed.
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    from qdistill import TrainConfig, train
    from qdistill.report import MetricsLog
    from qdistill.train.state import Checkpoint
    from tests.conftest import toy_dataset, toy_net

    out, kill_at = sys.argv[1], os.environ.get("KILL_AT")
    data = toy_dataset(n_train=600).holdout(100)
    torch.manual_seed(0)
    teacher = toy_net()
    train(teacher, data, TrainConfig(method="fp", epochs=2, batch_size=50))
    log = MetricsLog(os.path.join(out, "metrics.jsonl"))

    def record(r):
        log(r)
        if kill_at and f"{{r['phase']}}:{{r.get('step')}}" == kill_at and "loss" in r:
            os.kill(os.getpid(), signal.SIGKILL)

    torch.manual_seed(1)
    cfg = TrainConfig(method="qd+dq", bits=2, epochs=3, dq_epochs=2, batch_size=50, stochastic=True, guard="rollback")
    checkpoint = Checkpoint(os.path.join(out, "state.pt"), every_steps=3, log_path=os.path.join(out, "metrics.jsonl"))
    result = train(toy_net(), data, cfg, teacher=teacher, cache_dir=os.path.join(out, "cache"), log=record, checkpoint=checkpoint)
    torch.save(result.model.state_dict(), os.path.join(out, "final.pt"))
    """
)


def run(tmp_path, out, kill_at=None):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=os.getcwd()))
    env = {**os.environ, "KILL_AT": kill_at or ""}
    return subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=300)


def test_killed_twice_and_resumed_equals_uninterrupted(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert run(tmp_path, straight).returncode == 0
    # 10 steps per epoch: killed at step 14 of the qd phase (mid-epoch, 2 steps after the save at 12) ...
    first = run(tmp_path, killed, "qd+dq 2b:14")
    assert first.returncode == -signal.SIGKILL
    saved = torch.load(killed / "state.pt", weights_only=True)
    assert saved["current"]["phase"] == "qd+dq 2b" and saved["current"]["loop"]["step"] == 12
    # ... then, resumed, killed again in the second phase (learning the points) ...
    second = run(tmp_path, killed, "dq 2b points:8")
    assert second.returncode == -signal.SIGKILL
    saved = torch.load(killed / "state.pt", weights_only=True)
    assert list(saved["done"]) == ["qd+dq 2b"] and saved["current"]["loop"]["step"] == 6
    # ... and resumed to the end.
    assert run(tmp_path, killed).returncode == 0
    a, b = torch.load(straight / "final.pt"), torch.load(killed / "final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # each step is logged once, as in the uninterrupted run (timings aside)
    def records(path):
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert records(killed) == records(straight)


def toy_hook():
    from tests.conftest import toy_dataset

    return toy_dataset(n_train=300, n_test=100).holdout(50)


def test_cli_resume_refuses_finished_foreign_and_damaged_runs(tmp_path, capsys):
    teacher_dir = tmp_path / "t"
    hook = ["--dataset", "tests.train.test_resume:toy_hook", "--quiet"]
    assert main(["train-teacher", "--model", "tests.conftest:toy_net", "--epochs", "1", "--batch-size", "50", "--run-dir", str(teacher_dir), *hook]) == 0
    run_dir = tmp_path / "s"
    args = ["distill", "--student", "tests.conftest:toy_net", "--teacher", str(teacher_dir / "teacher.safetensors"), "--trust-code", "--bits", "2", "--epochs", "2", "--batch-size", "50"]
    assert main([*args, "--run-dir", str(run_dir), "--checkpoint-steps", "2", *hook]) == 0
    assert not (run_dir / "state.pt").exists()  # a finished run keeps its results, not its state
    capsys.readouterr()
    assert main(["distill", "--resume", str(run_dir)]) == 2
    assert "finished run" in capsys.readouterr().err
    assert main(["distill", "--resume", str(teacher_dir)]) == 2
    assert "not the directory of a `qdistill distill` run" in capsys.readouterr().err
    # a run killed before it finished: its results are gone, its state is there
    (run_dir / "results.json").unlink()
    (run_dir / "state.pt").write_bytes(b"\0" * 10)
    assert main(["distill", "--resume", str(run_dir)]) == 2  # the run names code: refused before anything is read
    assert "asks to run code: --student tests.conftest:toy_net; --dataset tests.train.test_resume:toy_hook; --trust-code" in capsys.readouterr().err
    assert main(["distill", "--resume", str(run_dir), "--trust-code"]) == 2
    assert "state.pt is damaged" in capsys.readouterr().err


def test_cli_resume_continues_a_killed_run(tmp_path):
    """The same run through `qdistill distill`, killed by SIGKILL at a logged step and resumed, packs the same model."""
    root = os.getcwd()
    killer = tmp_path / "killer.py"  # a dataset hook that arms the kill, then returns the toy data
    killer.write_text(KILLING_HOOK.format(root=root, imports="from tests.train.test_resume import toy_hook", data="toy_hook()"))
    teacher = tmp_path / "teacher.safetensors"
    from qdistill.models import save_checkpoint
    from tests.conftest import toy_net

    torch.manual_seed(0)
    save_checkpoint(toy_net(), {"factory": "tests.conftest:toy_net", "kwargs": {}}, teacher)
    cli = [sys.executable, "-c", "import sys; from qdistill.cli import main; sys.exit(main(sys.argv[1:]))"]
    common = ["distill", "--student", "tests.conftest:toy_net", "--teacher", str(teacher), "--trust-code", "--bits", "2", "--epochs", "3", "--batch-size", "50", "--checkpoint-steps", "4", "--dataset", "killer:data", "--quiet"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{root}"}
    assert subprocess.run([*cli, *common, "--run-dir", str(tmp_path / "a")], env=env, cwd=root, timeout=300).returncode == 0
    killed = subprocess.run([*cli, *common, "--run-dir", str(tmp_path / "b")], env={**env, "KILL_AT": "11"}, cwd=root, timeout=300)
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "b" / "state.pt").exists()
    assert subprocess.run([*cli, "distill", "--resume", str(tmp_path / "b"), "--trust-code"], env=env, cwd=root, timeout=300).returncode == 0
    rows = [json.loads((tmp_path / d / "results.json").read_text())["rows"][0] for d in "ab"]
    assert rows[0]["test_acc"] == rows[1]["test_acc"]
    assert (tmp_path / "a" / rows[0]["file"]).read_bytes() == (tmp_path / "b" / rows[1]["file"]).read_bytes()


def test_damaged_interval_is_refused(tmp_path):
    with pytest.raises(QDistillError, match="positive"):
        Checkpoint(tmp_path / "s.pt", every_steps=0)


def crafted_state(path, **loop):
    """A state.pt as a killed qat run leaves it, with its loop counters changed."""
    from qdistill.train.guard import DivergenceGuard
    from qdistill.train.state import capture
    from tests.conftest import toy_net

    from qdistill import TrainConfig, attach

    model = toy_net()
    attach(model, TrainConfig(method="qat", bits=2).make_quantizer("uniform"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    counters = {"step": 2, "seconds": 0.0, "seen": 100, "loss_sum": 0.0, "records": [], "grad_clip": None, "rollbacks": 0, "guard": DivergenceGuard("qat 2b", 4.0).state(), **loop}
    Checkpoint(path).save_running("qat 2b", capture(model, opt, schedule, counters))


@pytest.mark.parametrize(
    "loop, message",
    [({"step": 10**12}, "at step 1000000000000 of a phase of"), ({"seen": "x"}, "counters are damaged"), ({"guard": {}}, "counters are damaged")],
)
def test_a_state_whose_counters_are_damaged_or_crafted_is_refused(tmp_path, loop, message):
    """Before, a step past the phase's end saved the untrained model as finished."""
    from qdistill import TrainConfig, train
    from tests.conftest import toy_net

    crafted_state(tmp_path / "state.pt", **loop)
    with pytest.raises(QDistillError, match=message):
        train(toy_net(), toy_hook(), TrainConfig(method="qat", bits=2, epochs=1, batch_size=50), checkpoint=Checkpoint(tmp_path / "state.pt"))


@pytest.mark.parametrize("edit", [lambda s: s.update(current=[1]), lambda s: s["current"].update(phase=3), lambda s: s["current"].pop("rng"),
                                  lambda s: s["done"].update(x=None), lambda s: s.update(log_bytes=-1)])
def test_a_state_file_with_damaged_fields_is_refused_when_opened(tmp_path, edit):
    crafted_state(tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(QDistillError, match="is damaged"):
        Checkpoint(tmp_path / "state.pt")

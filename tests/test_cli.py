"""End to end through the command line, on a subset of the real Fashion-MNIST."""

import json
from pathlib import Path

import pytest

from qdistill.cli import main
from qdistill.tasks import ImageClassification
from qdistill.runtime import load_packed

needs_data = pytest.mark.usefixtures("fashion_mnist")  # skips where the library would have to download the data
SUBSET = ["--train-subset", "3000", "--test-subset", "1000", "--quiet"]


@needs_data
def test_train_distill_eval_inspect(tmp_path, capsys):
    assert main(["train-teacher", "--model", "resnet-small", "--epochs", "2", "--run-dir", str(tmp_path / "t"), *SUBSET]) == 0
    teacher = tmp_path / "t" / "teacher.safetensors"
    assert teacher.exists()
    assert main(["distill", "--method", "qd", "--bits", "4", "--epochs", "3", "--teacher", str(teacher), "--run-dir", str(tmp_path / "s"), *SUBSET]) == 0
    run = tmp_path / "s"
    row = json.loads((run / "results.json").read_text())["rows"][0]
    assert row["test_acc"] > 60  # chance is 10
    packed = run / row["file"]
    assert (run / "metrics.jsonl").exists() and (run / "report.md").exists() and (run / "training.png").exists()
    capsys.readouterr()
    assert main(["eval", str(packed), "--test-subset", "1000"]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] == row["test_acc"]  # the shipped file, same accuracy
    assert main(["generate", str(packed)]) == 2  # an image classifier: nothing to generate
    assert "is not a language model" in capsys.readouterr().err
    assert main(["inspect", str(packed), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["index_bits"] == [4] and info["disk_bytes"] == packed.stat().st_size
    # qd+dq by hand: learn the points of the packed qd model, taught by itself
    assert main(["distill", "--method", "dq", "--bits", "4", "--init", str(packed), "--points-init", "uniform", "--dq-teacher", "self", "--run-dir", str(tmp_path / "dq"), *SUBSET]) == 0
    dq = json.loads((tmp_path / "dq" / "results.json").read_text())["rows"][0]
    assert dq["test_acc"] > row["test_acc"] - 3
    # ptq from a full-precision checkpoint given with --init
    assert main(["distill", "--method", "ptq", "--bits", "8", "--init", str(teacher), "--student", "resnet-small", "--run-dir", str(tmp_path / "p"), *SUBSET]) == 0
    ptq = json.loads((tmp_path / "p" / "results.json").read_text())["rows"][0]
    assert ptq["test_acc"] > 60 and ptq["bits"] == 8
    assert main(["distill", "--method", "dq", "--run-dir", str(tmp_path / "x"), *SUBSET]) == 2
    assert "give trained ones with --init" in capsys.readouterr().err


@needs_data
def test_demo_writes_table_plots_and_models(tmp_path):
    run = tmp_path / "demo"
    args = ["demo", "--run-dir", str(run), "--epochs", "2", "--teacher-epochs", "1", "--bit-widths", "4", *SUBSET]
    assert main(args) == 0
    rows = json.loads((run / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp", "kd", "ptq", "ptq (global)", "qat", "qd", "qd (from kd, mse, T 1)"]
    for name in ("report.md", "accuracy_vs_bits.png", "accuracy_vs_size.png", "metrics.jsonl"):
        assert (run / name).exists()
    qd = next(r for r in rows if r["method"] == "qd")
    model, _ = load_packed(run / qd["file"])
    assert qd["bits"] == 4 and qd["test_acc"] > 40  # chance is 10; the 1-epoch teacher is at about 45
    # a second demo into the same folder is refused and changes nothing
    before = {p: p.read_bytes() for p in run.iterdir()}
    assert main(args) == 2
    assert {p: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize(
    "extra, epochs",
    [([], 1), (["--full"], 2), (["--epochs", "3"], 3), (["--full", "--config", "{config}"], 5)],
)
def test_demo_epochs_follow_the_plan_unless_given(tmp_path, monkeypatch, extra, epochs):
    """The quick demo trains each method 1 epoch (its 5-minute budget), --full 2; a flag or a config file wins."""
    import qdistill.cli
    import qdistill.demo

    (tmp_path / "c.yaml").write_text("epochs: 5\n")
    seen = {}
    monkeypatch.setattr(qdistill.cli, "task_from", lambda args, name: ImageClassification(None))
    monkeypatch.setattr(qdistill.demo, "run_demo", lambda data, run_dir, *a: seen.setdefault("cfg", a[4]) and [])
    monkeypatch.setattr(qdistill.cli, "show_rows", lambda *a: None)
    args = [a.replace("{config}", str(tmp_path / "c.yaml")) for a in extra]
    assert main(["demo", "--run-dir", str(tmp_path / "run"), *args]) == 0
    assert seen["cfg"].epochs == epochs


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, fashion_mnist):
    """`qdistill demo --full` at 2 bits: every method for three seeds; each saved model, loaded back,
    scores the accuracy its row reports, and the table summarizes the seeds."""
    from qdistill.data import load_dataset
    from qdistill.models import load_checkpoint
    from qdistill.report import ORDER
    from qdistill.train import evaluate

    run = tmp_path / "demo"
    subset = ["--train-subset", "2000", "--test-subset", "500", "--data-dir", str(fashion_mnist), "--quiet"]
    assert main(["demo", "--full", "--run-dir", str(run), "--teacher-epochs", "1", "--epochs", "1", "--bit-widths", "2", *subset]) == 0
    results = json.loads((run / "results.json").read_text())
    methods = ["fp", "kd", "ptq", "ptq (global)", "qat", "qd", "qat (from fp, mse)", "qd (from kd, mse, T 1)", "dq", "qd+dq"]
    rows = results["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for s in (0, 1, 2) for m in methods]
    data = load_dataset("fashion-mnist", fashion_mnist).subset(2000, 500)
    for r in rows:
        path = run / f"seed-{r['seed']}" / r["file"]
        model = load_packed(path)[0] if r["bits"] < 32 else load_checkpoint(path)[0]
        assert evaluate(model, data.test_x, data.test_y) == r["test_acc"], r["method"]
        assert r["bits"] == 32 or r["size_bytes"] == path.stat().st_size < rows[0]["size_bytes"]  # packed: smaller than fp32
    table = {r["method"]: r for r in results["table"]}
    qd = [r["test_acc"] for r in rows if r["method"] == "qd"]
    assert table["qd"]["mean"] == pytest.approx(sum(qd) / 3) and (table["qd"]["min"], table["qd"]["max"]) == (min(qd), max(qd))
    assert list(table) == ["teacher (resnet-small)", *ORDER] and sorted(ORDER) == sorted(methods)  # the tables' order
    assert (run / "report.md").exists() and (run / "teacher.safetensors").exists()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "argv,message",
    [
        (["distill", "--bits", "9"], "bits must be an integer from 1 to 8"),
        (["distill", "--bucket", "0"], "bucket must be a positive integer"),
        (["distill", "--method", "qd", "--data-dir", "/nonexistent"], "does not hold the four Fashion-MNIST IDX files"),
        (["inspect", "/nonexistent.safetensors"], "does not exist"),
        (["distill", "--student", "huge"], "unknown model 'huge'"),
        (["distill", "--checkpoint-steps", "0"], "checkpoint intervals must be positive"),
        (["distill", "--resume", "/nonexistent"], "not the directory of a `qdistill distill` run"),
        (["demo", "--workers", "0"], "workers must be a positive integer"),
    ],
)
def test_bad_input_gives_one_clear_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_corrupt_packed_file(tmp_path, capsys):
    bad = write(tmp_path / "bad.safetensors", "not a model")
    assert main(["inspect", str(bad)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_config_file_values_are_checked(tmp_path, capsys):
    cfg = write(tmp_path / "c.yaml", "alpha: 3\n")
    assert main(["distill", "--config", str(cfg)]) == 2
    assert "alpha" in capsys.readouterr().err


@needs_data
def test_mismatched_teacher_from_cli(tmp_path, capsys):
    from qdistill.models import build_model, save_checkpoint

    spec = {"factory": "torch.nn:Linear", "kwargs": {"in_features": 784, "out_features": 3}}
    wrong = tmp_path / "wrong.safetensors"
    save_checkpoint(build_model(spec), spec, wrong)
    assert main(["distill", "--teacher", str(wrong), "--run-dir", str(tmp_path / "r"), *SUBSET]) == 2
    assert "teacher" in capsys.readouterr().err


def text_folder(path: Path) -> Path:
    """Eight small documents of English-like text: enough for a 300-token BPE and a few training windows."""
    words = "the quick brown fox jumps over a lazy dog while python reads every line of this small text file".split()
    path.mkdir()
    for i in range(8):
        lines = [" ".join(words[(i + j) % len(words) :] + words[: (i + j) % len(words)]) for j in range(40)]
        (path / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return path


def test_language_model_train_distill_eval_generate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path / "cache"))
    texts = ["--text-dir", str(text_folder(tmp_path / "texts")), "--quiet"]
    common = [*texts, "--vocab-size", "300", "--seq-len", "32"]
    assert main(["train-teacher", "--model", "lstm-tiny", "--epochs", "3", "--lr", "0.01", "--run-dir", str(tmp_path / "t"), *common]) == 0
    teacher = tmp_path / "t" / "teacher.safetensors"
    args = ["distill", "--method", "qd", "--bits", "4", "--student", "lstm-tiny", "--teacher", str(teacher), "--epochs", "2", "--lr", "0.01"]
    assert main([*args, "--run-dir", str(tmp_path / "s"), *common]) == 0
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    row, cfg = results["rows"][0], results["config"]
    assert cfg["optimizer"] == "adamw" and cfg["schedule"] == "cosine"  # the task's defaults, the flags on top
    assert row["test_ppl"] < 30 < 300 and row["test_bpb"] > 0 and row["bits"] == 4  # uniform would be ~300
    assert (tmp_path / "s" / "training.png").exists()
    packed = tmp_path / "s" / row["file"]
    capsys.readouterr()
    assert main(["eval", str(packed), *texts]) == 0  # the file says: a language model, its vocabulary, its windows
    assert json.loads(capsys.readouterr().out)["test_ppl"] == row["test_ppl"]
    assert main(["generate", str(packed), "--prompt", "the quick", "--tokens", "8", *texts]) == 0
    assert capsys.readouterr().out.startswith("the quick")
    assert main(["generate", str(packed), "--tokens", "0", *common]) == 2
    assert "--tokens must be from 1" in capsys.readouterr().err
    assert main(["eval", str(packed), "--quiet"]) == 2  # trained on a folder of text: not scored on another corpus
    assert "give its data again (--text-dir" in capsys.readouterr().err


def test_language_model_demo_writes_table_plots_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "demo"
    args = ["demo", "--task", "lm", "--text-dir", str(text_folder(tmp_path / "texts")), "--vocab-size", "300", "--seq-len", "32",
            "--student", "gpt-tiny", "--teacher", "lstm-tiny", "--bit-widths", "2", "--epochs", "1", "--workers", "1", "--run-dir", str(run), "--quiet"]
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["fp", "kd", "ptq", "ptq (global)", "qat", "qd", "qd (from kd, mse, T 1)"]
    assert all(r["test_ppl"] > 1 for r in results["table"]) and results["table"][0]["method"] == "teacher (lstm-tiny)"
    for name in ("report.md", "samples.md", "ppl_vs_bits.png", "ppl_vs_size.png"):
        assert (run / name).exists(), name
    samples = (run / "samples.md").read_text()
    assert samples.count("```") == 2 * (1 + len(methods))  # the teacher and every method continue the prompt


def test_kernel_ready_flags_reach_the_packed_file(tmp_path, capsys):
    run = tmp_path / "r"
    flags = ["--groups", "row", "--zero-point", "int", "--scale-dtype", "float16"]
    data = ["--dataset", "tests.conftest:toy_dataset", "--train-subset", "64", "--test-subset", "32", "--quiet"]
    assert main(["distill", "--method", "qat", "--epochs", "1", "--bucket", "8", *flags, *data, "--run-dir", str(run)]) == 0
    row = json.loads((run / "results.json").read_text())["rows"][0]  # its accuracy is the reloaded file's (pipeline)
    meta = load_packed(run / row["file"])[1]
    assert {(e["groups"], e["zero_point"], e["scale_dtype"], e["bucket"]) for e in meta["quantized"]} == {("row", "int", "float16", 8)}
    assert meta["info"]["config"]["groups"] == "row"
    capsys.readouterr()
    assert main(["inspect", str(run / row["file"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["groups"], info["zero_points"], info["scale_dtypes"]) == (["row"], ["int"], ["float16"])


def test_kernel_ready_flags_override_the_config_file(tmp_path):
    from qdistill.cli import build_parser, config_from

    cfg_file = write(tmp_path / "c.yaml", "groups: row\nzero_point: int\nscale_dtype: bfloat16\n")
    args = build_parser().parse_args(["distill", "--config", str(cfg_file), "--scale-dtype", "float16"])
    cfg = config_from(args, method="qd")
    assert (cfg.groups, cfg.zero_point, cfg.scale_dtype) == ("row", "int", "float16")
    default = config_from(build_parser().parse_args(["distill"]), method="qd")
    assert (default.groups, default.zero_point, default.scale_dtype) == ("flat", "float", "float32")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["distill", "--groups", "column"], "groups must be one of flat, row"),
        (["distill", "--scale-dtype", "half"], "scale_dtype must be one of float32, float16, bfloat16"),
        (["distill", "--method", "dq", "--zero-point", "int"], "use zero_point float"),
    ],
)
def test_bad_kernel_ready_flags_give_one_clear_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_librarys_warnings_reach_the_terminal_once_and_escaped(capsys):
    """The library warns through logging; the command shows each warning once, as `warning: ...` on
    stderr, control characters (a cache path from someone else) escaped, whatever ran before."""
    import logging

    from qdistill.cli import show_library_log

    show_library_log(quiet=False)
    show_library_log(quiet=True)
    logging.getLogger("qdistill.distill.teacher").warning("ignoring the cache %s", "/tmp/x\x1b[2J")
    logging.getLogger("qdistill.data.text").info("tokenizing (hidden with --quiet)")
    err = capsys.readouterr().err
    assert err == "warning: ignoring the cache /tmp/x\\x1b[2J\n"

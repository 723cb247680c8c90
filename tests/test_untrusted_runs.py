"""Run directories, exports and output from someone else: a crafted run dir runs no code and writes
nothing outside itself, exports never write through links, and what a file holds reaches the terminal
only as text."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from qdistill import TrainConfig, UniformQuantizer, attach, save_packed
from qdistill.cli import main
from qdistill.models import build_model, model_spec

MARKER = "QDISTILL_TEST_MARKER"


def ran(*args, **kwargs):
    """A 'factory' or 'dataset hook' a crafted run directory names: it leaves a file where $MARKER says."""
    Path(os.environ[MARKER]).write_text("ran")
    raise SystemExit("code named by a run directory was run")


def toy_hook():
    from tests.conftest import toy_dataset

    return toy_dataset(n_train=200, n_test=100)


TOY = {"student": "tests.conftest:toy_net", "dataset": "tests.test_untrusted_runs:toy_hook", "quiet": True, "checkpoint_steps": 2}


def run_dir(tmp_path, name="run", config=None, **saved) -> Path:
    """A run directory as `qdistill distill` leaves it before its first checkpoint, with run.json as given."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"command": "distill", **saved}))
    (folder / "config.yaml").write_text(yaml.safe_dump(config or TrainConfig(method="qat", epochs=1, batch_size=50).to_dict()))
    return folder


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qdistill: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "saved, named",
    [
        ({"student": "tests.test_untrusted_runs:ran"}, "--student tests.test_untrusted_runs:ran"),
        ({"teacher_model": "tests.test_untrusted_runs:ran", "method": "kd"}, "--teacher-model tests.test_untrusted_runs:ran"),
        ({"dataset": "tests.test_untrusted_runs:ran"}, "--dataset tests.test_untrusted_runs:ran"),
        ({"trust_code": True, "init": "model.safetensors"}, "--trust-code"),
    ],
)
def test_resume_runs_no_code_the_directory_names(tmp_path, capsys, monkeypatch, saved, named):
    monkeypatch.setenv(MARKER, str(tmp_path / "marker"))
    folder = run_dir(tmp_path, **saved)
    assert main(["distill", "--resume", str(folder)]) == 2
    err = one_error_line(capsys)
    assert "asks to run code" in err and named in err and "--trust-code" in err
    assert not (tmp_path / "marker").exists()


def test_resume_trusts_code_only_on_the_users_own_word(tmp_path, capsys, monkeypatch):
    """With --trust-code on the resume command the named code runs (here: the marker is left)."""
    monkeypatch.setenv(MARKER, str(tmp_path / "marker"))
    folder = run_dir(tmp_path, dataset="tests.test_untrusted_runs:ran")
    with pytest.raises(SystemExit):
        main(["distill", "--resume", str(folder), "--trust-code"])
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize(
    "saved",
    [
        {"train_subset": "all"},
        {"bits": [4]},
        {"method": "rm -rf"},
        {"token_files": "a b c"},
        {"include": [1, 2]},
        {"quiet": "yes"},
        {"no_such_option": 1},
        {"checkpoint_minutes": "5"},
    ],
)
def test_resume_checks_each_value_as_the_command_line_would(tmp_path, capsys, saved):
    assert main(["distill", "--resume", str(run_dir(tmp_path, **saved))]) == 2
    assert "cannot resume" in one_error_line(capsys)


@pytest.mark.parametrize("text", ["[1, 2]", "null", "{", '{"command": "train-teacher"}', "\"distill\"", '{"command": "distill", "lr": 1e999}'])
def test_damaged_run_json_is_one_error(tmp_path, capsys, text):
    folder = run_dir(tmp_path)
    (folder / "run.json").write_text(text)
    assert main(["distill", "--resume", str(folder)]) == 2
    assert "cannot resume" in one_error_line(capsys)


@pytest.mark.parametrize("victim_at", ["metrics.jsonl", "report.md", "state.pt.tmp", "training.png"])
def test_resume_never_writes_through_a_link_in_the_run_dir(tmp_path, capsys, victim_at):
    """A link planted in a run directory at a file the run writes: the file it points to is left as it was."""
    folder = run_dir(tmp_path, **TOY)
    victim = tmp_path / "victim"
    victim.write_text("the user's own file\n")
    (folder / victim_at).symlink_to(victim)
    rc = main(["distill", "--resume", str(folder), "--trust-code"])
    assert victim.read_text() == "the user's own file\n"
    if victim_at == "metrics.jsonl":  # the log is appended to: refused
        assert rc == 2 and "symbolic link" in one_error_line(capsys)
    else:  # written whole: the link itself is replaced
        assert rc == 0 and not (folder / victim_at).is_symlink() or victim_at == "state.pt.tmp"


def test_a_dangling_results_link_is_a_finished_run(tmp_path, capsys):
    folder = run_dir(tmp_path, **TOY)
    (folder / "results.json").symlink_to(tmp_path / "created-outside")
    assert main(["distill", "--resume", str(folder), "--trust-code"]) == 2
    assert "finished run" in one_error_line(capsys) and not (tmp_path / "created-outside").exists()


def test_a_run_that_fails_before_training_leaves_no_run_dir(tmp_path, capsys, monkeypatch):
    """Here the device: a machine without CUDA refuses --device cuda (before, the run directory was left and
    the same command was then refused); and a failure inside the run removes only what the run wrote."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["distill", "--method", "qat", "--student", "tests.conftest:toy_net", "--trust-code", "--dataset", "tests.test_untrusted_runs:toy_hook", "--quiet", "--run-dir", str(tmp_path / "r")]
    assert main([*args, "--device", "cuda"]) == 2
    assert "no such CUDA device" in one_error_line(capsys) and not (tmp_path / "r").exists()
    import qdistill.pipeline

    monkeypatch.setattr(qdistill.pipeline, "train", lambda *a, **k: (_ for _ in ()).throw(qdistill.QDistillError("the data are unreadable")))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mine.txt").write_text("kept")
    assert main(args[:-1] + [str(tmp_path / "r" / "sub")]) == 2
    assert not (tmp_path / "r" / "sub").exists()
    monkeypatch.undo()
    assert main([*args[:-1], str(tmp_path / "r" / "sub"), "--epochs", "1", "--batch-size", "50"]) == 0  # the same command, now it can run


def packed_lm(tmp_path) -> Path:
    torch.manual_seed(0)
    spec = model_spec("gpt-tiny", num_classes=64)
    model = build_model(spec)
    attach(model, UniformQuantizer(bits=4, bucket=32, groups="row"))
    return save_packed(model, spec, tmp_path / "lm.safetensors", info={"task": {"task": "lm", "vocab_size": 64, "seq_len": 16}})


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_export_never_writes_through_the_temporary_name(tmp_path, capsys, fmt):
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "gguf")
    packed = packed_lm(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("the user's own file")
    (tmp_path / f".m.{fmt}.tmp").symlink_to(victim)  # the fixed temporary name exports used
    assert main(["export", str(packed), str(tmp_path / f"m.{fmt}"), "--format", fmt]) == 0, capsys.readouterr().err
    assert victim.read_text() == "the user's own file" and (tmp_path / f"m.{fmt}").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".m.{fmt}.") and not p.is_symlink()]  # no temporary left


def test_a_failed_export_keeps_a_file_of_the_temporary_name(tmp_path, capsys):
    packed = packed_lm(tmp_path)
    mine = tmp_path / ".m.gguf.tmp"
    mine.write_text("mine")
    assert main(["export", str(packed), str(tmp_path / "m.gguf"), "--format", "gguf", "--tokenizer", str(tmp_path / "none.json")]) == 2
    one_error_line(capsys)
    assert mine.read_text() == "mine" and not (tmp_path / "m.gguf").exists()


def test_hf_export_copies_no_linked_secret_and_writes_the_usual_modes(tmp_path, capsys):
    pytest.importorskip("transformers")
    packed = packed_lm(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("password")
    secret.chmod(0o600)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").symlink_to(secret)
    old = os.umask(0o022)
    try:
        assert main(["export", str(packed), str(tmp_path / "hf"), "--tokenizer", str(tok)]) == 2
        assert "link to a file outside" in one_error_line(capsys) and not (tmp_path / "hf").exists()
        (tok / "vocab.txt").unlink()
        (tok / "vocab.txt").write_text("[PAD]\n")
        assert main(["export", str(packed), str(tmp_path / "hf"), "--tokenizer", str(tok)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == 0o644 and modes["vocab.txt"] == 0o644, modes


def test_hf_cache_links_inside_the_model_folder_are_followed(tmp_path):
    from qdistill.export.hf import find_tokenizer_files

    repo = tmp_path / "models--x"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "blobs" / "123").write_text("{}")
    (repo / "snapshots" / "abc" / "tokenizer.json").symlink_to("../../blobs/123")
    assert [f.name for f in find_tokenizer_files(repo / "snapshots" / "abc")] == ["tokenizer.json"]


ESCAPE = "\x1b[2J\x1b[Hall checks passed\r"


def test_errors_and_inspect_show_no_terminal_escapes(tmp_path, capsys):
    packed = packed_lm(tmp_path)
    crafted = tmp_path / f"m{ESCAPE}.safetensors"
    crafted.write_bytes(packed.read_bytes())
    assert main(["inspect", str(crafted)]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\r" not in shown and "\\x1b[2J" in shown.replace("\n", "")
    crafted.write_bytes(b"\0" * 100)
    assert main(["inspect", str(crafted)]) == 2
    err = one_error_line(capsys)
    assert "\x1b" not in err and "\\x1b[2J" in err


def test_generate_prints_text_not_markup(tmp_path, capsys, monkeypatch):
    """The prompt and the model's output are shown as they are: rich markup in them is text, escapes are escaped."""
    import qdistill.cli

    monkeypatch.setattr(qdistill.cli, "generate", lambda model, prompt, *a, **k: prompt)
    monkeypatch.setattr(qdistill.cli, "model_and_task", lambda args, require_lm: (None, type("T", (), {"seq_len": 8, "corpus": type("C", (), {"tokenizer": lambda self: Tok()})()})()))

    class Tok:
        def encode(self, text):
            return type("E", (), {"ids": [1, 2]})()

        def decode(self, ids):
            return "[red]x[/red]\x1b[2J\nline"

    assert main(["generate", "m.safetensors", "--prompt", "[bold]p[/bold]"]) == 0
    out = capsys.readouterr().out
    assert "[bold]p[/bold][red]x[/red]\\x1b[2J\nline" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["distill", "--lr", "nan"], "lr must be a finite number"),
        (["distill", "--seed", str(2**70)], "seed must be from 0"),
        (["distill", "--device", "gpu7"], "unknown device"),
        (["distill", "--train-subset", "0"], "--train-subset must be at least 1"),
        (["distill", "--test-subset", "0"], "--test-subset must be at least 1"),
        (["distill", "--checkpoint-minutes", "nan"], "checkpoint intervals must be positive"),
        (["distill", "--checkpoint-minutes", "inf"], "checkpoint intervals must be positive"),
        (["generate", "m.safetensors", "--temperature", "nan"], "--temperature must be from 0 to 100"),
        (["generate", "m.safetensors", "--temperature", "inf"], "--temperature must be from 0 to 100"),
        (["generate", "m.safetensors", "--temperature", "-1"], "--temperature must be from 0 to 100"),
        (["generate", "m.safetensors", "--seed", str(2**70)], "--seed must be from 0"),
    ],
)
def test_values_out_of_range_are_one_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--quiet"] if argv[0] == "distill" else argv) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("lr: x", "lr must be a finite number"),
        ("exclude: [1, 2]", "exclude must be a list of strings"),
        ("include: '*.fc'", "include must be a list of strings"),
        ("epochs: 1.5", "epochs must be an integer"),
        ("stochastic: 'yes'", "stochastic must be true or false"),
        ("seed: -1", "seed must be from 0"),
        ("bucket: [256]", "bucket must be an integer or null"),
        ("[1, 2]", "must hold a mapping"),
        ("lr: &a [*a]", "lr must be a finite number"),
        ("no_such_key: 1", "unknown config keys"),
    ],
)
def test_config_values_of_the_wrong_type_are_one_error(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    assert main(["distill", "--config", str(config), "--quiet"]) == 2
    assert message in one_error_line(capsys)


def test_a_config_that_is_a_directory_is_one_error(tmp_path, capsys):
    assert main(["distill", "--config", str(tmp_path), "--quiet"]) == 2
    assert "is a directory" in one_error_line(capsys)

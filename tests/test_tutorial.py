"""docs/own-language-model.md, run: every `qdistill` command and Python script on the page, in order, on a tiny
LLaMA saved with its own tokenizer and a JSON-lines file (windows of 32 tokens, a few steps)."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM  # noqa: E402

from qdistill import load_packed  # noqa: E402
from qdistill.cli import main  # noqa: E402
from tests.models.test_causal_lms import save_model, tokenizer_for  # noqa: E402
from tests.test_cli import text_folder  # noqa: E402

PAGE = Path(__file__).parents[1] / "docs" / "own-language-model.md"
CONSTANTS = re.compile(r"^(MODEL, .*) = (.*)$", re.M)  # a script's settings line: its paths, and its steps cut to 3


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(), re.S)


def test_the_tutorial_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    texts = text_folder(tmp_path / "texts")
    tokenizer = tokenizer_for(texts)
    save_model(tmp_path / "my-model", "llama", tokenizer)
    docs = [line for p in sorted(texts.iterdir()) for line in p.read_text().splitlines()]
    Path("my-text.jsonl").write_text("".join(json.dumps({"text": " ".join(docs[i : i + 5])}) + "\n" for i in range(0, len(docs), 5)))
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.startswith("qdistill ")]
    assert len(commands) == 6
    for command in commands:
        argv = shlex.split(command.replace("--seq-len 128", "--seq-len 32"))[1:]  # the tiny model has 64 positions
        assert main([*argv, "--quiet"] if argv[0] in ("distill", "eval") else argv) == 0, command
    out = " ".join(capsys.readouterr().out.split())
    assert "the gguf package reads every weight back within 0.0e+00" in out and "no tokenizer" not in out
    packed = load_packed("runs/my4/qd-4b.safetensors")[0].eval()
    ids = torch.tensor([tokenizer.encode("the quick brown fox")])
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained("runs/my4-hf").eval()(ids).logits, packed(ids).logits)
    scripts = blocks("python")
    assert len(scripts) == 2
    for script in scripts:
        settings = CONSTANTS.search(script)
        names = [n.strip() for n in settings.group(1).split(",")]
        script = script.replace(settings.group(0), f"{settings.group(1)} = {settings.group(2).rsplit(',', 1)[0]}, 3" if names[-1] == "STEPS" else settings.group(0))
        exec(compile(script, str(PAGE), "exec"), {})
    trained = load_packed("runs/trainer4/qdistill.safetensors")[0].eval()
    looped = load_packed("runs/loop4.safetensors")[0].eval()
    with torch.no_grad():
        assert trained(ids).logits.shape == looped(ids).logits.shape == packed(ids).logits.shape

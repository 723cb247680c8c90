"""Bad and crafted inputs against the command line, counted: each case must end in one `qdistill: error:`
line (exit 2) that names the problem, with no traceback, no silent success, no hang and no code run.

    python bench/bad_inputs.py            # writes bench/results/bad-inputs.md

Every case runs in this process through `qdistill.cli.main`, in a fresh folder, with a 60 s alarm. A
case that reaches training is stopped there (`run_method` replaced by a refusal): it passed every check,
which for a bad input is a failure ("silent")."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

import qdistill.cli
from qdistill import TrainConfig, UniformQuantizer, attach, save_packed
from qdistill.models import build_model, model_spec, save_checkpoint

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository: its tests' file crafting

from tests.crafted import floats_into_uint8_blob, rewrite  # noqa: E402


class Hang(BaseException):
    pass


class ReachedTraining(Exception):
    pass


def ran(*args, **kwargs):
    """What a crafted run directory names as its model factory or dataset hook: it leaves CODE-RAN behind."""
    Path(os.environ["QDISTILL_BENCH_DIR"], "CODE-RAN").write_text("ran")
    raise SystemExit(3)


def fixtures(d: Path) -> dict:
    """The good files the cases damage: a packed conv student, a packed LM, a checkpoint, token files, a run dir."""
    torch.manual_seed(0)
    conv = build_model(model_spec("tiny"))
    attach(conv, UniformQuantizer(4, 64))
    lm_spec = model_spec("gpt-tiny", num_classes=64)
    lm = build_model(lm_spec)
    attach(lm, UniformQuantizer(4, 32, groups="row"))
    f = {
        "packed": save_packed(conv, model_spec("tiny"), d / "tiny-4b.safetensors"),
        "lm": save_packed(lm, lm_spec, d / "lm-4b.safetensors", info={"task": {"task": "lm", "vocab_size": 64, "seq_len": 16}}),
    }
    ckpt = d / "ckpt.safetensors"
    save_checkpoint(build_model(model_spec("tiny")), model_spec("tiny"), ckpt)
    f["ckpt"] = ckpt
    for split in ("train", "val", "test"):
        np.save(d / f"{split}.npy", np.arange(200, dtype=np.int64) % 64)
    return f


def run_dir(d: Path, name: str, config: dict | None = None, **saved) -> str:
    folder = d / name
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"command": "distill", **saved}))
    (folder / "config.yaml").write_text(yaml.safe_dump(config if config is not None else TrainConfig(method="qat", epochs=1).to_dict()))
    return str(folder)


def config_file(d: Path, name: str, text: str) -> str:
    (d / name).write_text(text)
    return str(d / name)


def cases(d: Path, f: dict) -> list[tuple[str, str, list[str]]]:
    """(class, case, argv)."""
    tokens = [str(d / f"{s}.npy") for s in ("train", "val", "test")]
    out: list[tuple[str, str, list[str]]] = []

    # run directories
    for key, value in [("student", "bad_inputs:ran"), ("teacher_model", "bad_inputs:ran"), ("dataset", "bad_inputs:ran"), ("trust_code", True)]:
        out.append(("run dir names code", f"{key}={value}", ["distill", "--resume", run_dir(d, f"code-{key}", **{key: value, "method": "kd" if key == "teacher_model" else "qat"})]))
    for key, value in [("train_subset", "all"), ("bits", [4]), ("method", "x"), ("token_files", "a"), ("include", [1]), ("quiet", "yes"),
                       ("junk", 1), ("checkpoint_minutes", "5"), ("checkpoint_minutes", float("inf")), ("token_files", ["a", 1, "c"])]:
        out.append(("run dir wrong value", f"{key}={value!r}", ["distill", "--resume", run_dir(d, f"value-{len(out)}", **{key: value})]))
    for text in ["[]", "null", "{", '"distill"', '{"command": "eval"}']:
        folder = run_dir(d, f"json-{len(out)}")
        (Path(folder) / "run.json").write_text(text)
        out.append(("run dir damaged", text, ["distill", "--resume", folder]))
    for field in ["lr: x", "epochs: 1.5", "bits: 99", "seed: -1", "[1]"]:
        out.append(("run dir damaged", f"config.yaml {field}", ["distill", "--resume", run_dir(d, f"cfg-{len(out)}", config=yaml.safe_load(field))]))
    for name, state in [("garbage", b"\0" * 10), ("step 10**12", None)]:
        folder = run_dir(d, f"state-{name}", dataset="fashion-mnist", data_dir=str(d / "nowhere"))
        if state is None:
            torch.save({"done": {}, "current": {"phase": "qat 4b", "loop": {"step": 10**12}}, "log_bytes": 0}, Path(folder) / "state.pt")
        else:
            (Path(folder) / "state.pt").write_bytes(state)
        out.append(("run dir damaged", f"state.pt {name}", ["distill", "--resume", folder]))
    for link in ["metrics.jsonl", "results.json"]:
        folder = run_dir(d, f"link-{link}", data_dir=str(d / "nowhere"))
        (Path(folder) / link).symlink_to(d / f"outside-{link}")
        out.append(("run dir link", link, ["distill", "--resume", folder]))

    # configs and flags
    for text in ["lr: x", "exclude: [1, 2]", "include: '*.fc'", "epochs: 1.5", "stochastic: 'yes'", "bucket: [1]", "grad_clip: .nan", "[1, 2]", "{", "no_such: 1"]:
        out.append(("config", text, ["distill", "--config", config_file(d, f"c{len(out)}.yaml", text)]))
    out.append(("config", "a directory", ["distill", "--config", str(d)]))
    for flags in [["--seed", str(2**70)], ["--device", "cuda:7"], ["--device", "tpu"], ["--train-subset", "0"], ["--test-subset", "0"],
                  ["--val-size", "-1"], ["--checkpoint-minutes", "nan"], ["--checkpoint-steps", "0"], ["--lr", "inf"], ["--bits", "0"],
                  ["--temperature", "nan"], ["--alpha", "2"], ["--bucket", "-3"]]:
        out.append(("flag", " ".join(flags), ["distill", *flags]))
    for flags in [["--temperature", "nan"], ["--temperature", "inf"], ["--temperature", "-1"], ["--seed", str(2**70)], ["--tokens", "0"], ["--top-k", "-1"]]:
        out.append(("flag", "generate " + " ".join(flags), ["generate", str(f["lm"]), *flags, "--token-files", *tokens, "--vocab-size", "64"]))

    # token files
    big = d / "big.npy"
    np.save(big, np.arange(200, dtype=np.int64))
    neg = d / "neg.npy"
    np.save(neg, -np.ones(200, dtype=np.int64))
    flt = d / "float.npy"
    np.save(flt, np.ones(200, dtype=np.float32))
    obj = d / "obj.npy"
    np.save(obj, np.array([{}], dtype=object), allow_pickle=True)
    short = d / "short.npy"
    short.write_bytes(big.read_bytes()[:90])
    for name, path in [("ids >= vocab", big), ("negative ids", neg), ("float ids", flt), ("pickled objects", obj), ("truncated", short)]:
        out.append(("token files", name, ["eval", str(f["lm"]), "--token-files", str(path), *tokens[1:], "--vocab-size", "64"]))
    out.append(("token files", "ids >= model vocab", ["eval", str(f["lm"]), "--token-files", str(big), str(big), str(big), "--vocab-size", "200"]))

    # packed files and checkpoints
    def nan_kept(t):
        t["fp.float32"] = t["fp.float32"].clone().fill_(float("nan"))

    llama = {"factory": "qdistill.models:hf_model", "kwargs": {"head": "causal-lm", "config": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}}}
    t5 = {"factory": "qdistill.models:hf_model", "kwargs": {"head": "encoder", "config": {"model_type": "t5", "vocab_size": 64, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_decoder_layers": 10**7, "num_heads": 2}}}
    packed_cases = [
        ("NaN full-precision tensor", rewrite(f["packed"], d / "nan.safetensors", edit_tensors=nan_kept)),
        ("float weights in a uint8 blob", floats_into_uint8_blob(f["packed"], d / "u8.safetensors")),
        ("7B LLaMA spec in 20 kB", rewrite(f["packed"], d / "llama.safetensors", lambda m: m.update(spec=llama))),
        ("T5 of 10**7 decoder layers", rewrite(f["packed"], d / "t5.safetensors", lambda m: m.update(spec=t5))),
        ("tensor name with escapes", rewrite(f["packed"], d / "esc.safetensors", lambda m: m["quantized"][0].update(name="\x1b[2J\x1b[Hok", shape=[-1]))),
    ]
    for name, path in packed_cases:
        out.append(("packed file", name, ["eval", str(path)]))
        out.append(("packed file", f"{name} (export)", ["export", str(path), str(d / f"x-{len(out)}"), "--format", "hf"]))
    ckpt_nan = d / "ckpt-nan.safetensors"
    state = {k: v.clone() for k, v in build_model(model_spec("tiny")).state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].fill_(float("nan"))
    save_file(state, str(ckpt_nan), metadata={"qdistill": "checkpoint", "spec": json.dumps(model_spec("tiny"))})
    out.append(("checkpoint", "NaN weights", ["eval", str(ckpt_nan)]))

    # tokenizers, Hugging Face folders, exports
    tok = d / "tokenizer.json"
    vocab = {f"t{i}": i for i in range(64)}
    tok.write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}))
    panic = json.loads(tok.read_text())
    panic["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [{"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {}}
    (d / "panic.json").write_text(json.dumps(panic))
    regex = json.loads(tok.read_text())
    regex["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(("}, "behavior": "Isolated", "invert": False}
    (d / "regex.json").write_text(json.dumps(regex))
    for name in ("panic", "regex"):
        out.append(("tokenizer", name, ["generate", str(f["lm"]), "--token-files", *tokens, "--vocab-size", "64", "--tokenizer", str(d / f"{name}.json")]))
    for name, edit in [("ids >= vocab", {"t0": 999}), ("negative id", {"t0": -1}), ("duplicate id", {"t1": 0}), ("id not an integer", {"t0": "x"})]:
        bad = json.loads(tok.read_text())
        bad["model"]["vocab"].update(edit)
        path = d / f"gguf-{len(out)}.json"
        path.write_text(json.dumps(bad))
        out.append(("gguf tokenizer", name, ["export", str(f["lm"]), str(d / f"g{len(out)}.gguf"), "--format", "gguf", "--tokenizer", str(path)]))
    secret = d / "secret"
    secret.write_text("secret")
    linked = d / "linked-tok"
    linked.mkdir()
    (linked / "vocab.txt").symlink_to(secret)
    out.append(("export", "tokenizer file linked outside", ["export", str(f["lm"]), str(d / "hf-out"), "--tokenizer", str(linked)]))
    for name, config in [("auto_map", {"auto_map": {"AutoModel": "x.y"}}), ("10**7 layers", {"num_hidden_layers": 10**7}), ("unknown type", {"model_type": "evil"})]:
        folder = d / f"hf-{len(out)}"
        folder.mkdir()
        base = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}
        (folder / "config.json").write_text(json.dumps({**base, **config}))
        save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
        out.append(("hf folder", name, ["eval", f"hf:{folder}", "--teacher", f"hf:{folder}"]))
    return out


def classify(argv: list[str], seconds: int = 60) -> tuple[str, str]:
    """handled, traceback, silent, hang or noisy (not one error line), and what was printed."""
    err, stdout = io.StringIO(), io.StringIO()

    def alarm(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
            rc = qdistill.cli.main([*argv, "--quiet"] if argv[0] == "distill" and "--quiet" not in argv else argv)
    except Hang:
        return "hang", ""
    except ReachedTraining:
        return "silent", "reached training"
    except SystemExit as e:  # argparse's own refusal: usage and one error line
        return ("handled", err.getvalue().strip().splitlines()[-1]) if e.code == 2 else ("traceback", f"SystemExit {e.code}")
    except BaseException as e:
        return "traceback", f"{type(e).__name__}: {str(e)[:120]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    text = err.getvalue()
    if rc == 0:
        return "silent", stdout.getvalue()[:120]
    one_line = text.count("\n") == 1 and text.startswith("qdistill: error: ") and "\x1b" not in text
    return ("handled" if rc == 2 and one_line else "noisy"), text.strip()[:300]


def run_cases() -> list[tuple[str, str, str, str]]:
    """(class, case, outcome, what it said) for every case, each in a fresh folder of one temporary one."""
    rows = []
    saved = qdistill.cli.run_method, {k: os.environ.get(k) for k in ("QDISTILL_CACHE", "QDISTILL_BENCH_DIR")}, os.getcwd()
    qdistill.cli.run_method = lambda *a, **k: (_ for _ in ()).throw(ReachedTraining())
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        os.environ["QDISTILL_CACHE"], os.environ["QDISTILL_BENCH_DIR"] = str(d / "cache"), str(d)
        os.chdir(d)
        try:
            for kind, name, argv in cases(d, fixtures(d)):
                outcome, said = classify(argv)
                code_ran = any(p.name == "CODE-RAN" or p.name.startswith("outside-") for p in d.iterdir())
                for p in d.iterdir():  # each case is judged on its own
                    if p.name == "CODE-RAN" or p.name.startswith("outside-"):
                        p.unlink()
                rows.append((kind, name, "code ran / wrote outside" if code_ran else outcome, said.replace(tmp, "TMP")))
        finally:
            qdistill.cli.run_method = saved[0]
            for k, v in saved[1].items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            os.chdir(saved[2])
    return rows


def main(argv: list[str] | None = None) -> list[tuple[str, str, str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "bad-inputs.md"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run_cases()
    bad = [r for r in rows if r[2] != "handled"]
    lines = [
        "# Bad and crafted inputs against the command line",
        "",
        f"`python bench/bad_inputs.py`: {len(rows)} cases, {len(rows) - len(bad)} handled (exit 2, one `qdistill: error:` line, "
        f"nothing run or written outside), {len(bad)} mishandled; {time.perf_counter() - start:.0f} s, torch {torch.__version__}.",
        "",
        "| class | case | outcome | what it said |",
        "|---|---|---|---|",
        *[f"| {k} | {n.replace('|', '/')} | {o} | {s.replace('|', '/').replace(chr(10), ' ')[:160]} |" for k, n, o, s in rows],
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3]))
    for row in bad:
        print("MISHANDLED", row)
    return rows


if __name__ == "__main__":
    main()

"""docs/own-language-model.md on a model that has learned something: the tutorial's commands, measured.

No pretrained causal LM can be downloaded here, so the "model you bring" is made first, the way a user's
would be: a gpt-* LLaMA trained by `qdistill train-teacher` on the Python docs' training files, exported
with `qdistill export` to a save_pretrained folder with its byte-level BPE tokenizer (and a
tokenizer_config.json naming its end-of-text token). The text is the same files as JSON lines, one file
per row, in train/validation/test files split as the teacher's corpus was (no test file is trained on).
Then the tutorial, as written: qd at 4 bits in GGUF's Q4_1 layout from the model itself, ptq of the model
at the same layout for comparison, eval of all three on the test file, GGUF export, and llama.cpp's logits
on test windows against the packed model's (when node-llama-cpp is installed: see bench/llama_cpp.py).

Each step is skipped when its output exists, so a killed run continues. Writes bench/results/own-lm-<tag>.{json,md}.

    python bench/own_lm.py                 # about half an hour on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results"
Q4_1 = ["--groups", "row", "--bucket", "32", "--scale-dtype", "float16"]


def qdistill(*argv: str) -> str:
    """One qdistill command, in this process; its standard output. A failure stops the benchmark."""
    from qdistill.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    if code:
        raise SystemExit(f"qdistill {' '.join(map(str, argv))} failed ({code})")
    return out.getvalue()


def make_model(work: Path, preset: str, tokens: int, epochs: int, seq_len: int) -> Path:
    """The model a user brings: a save_pretrained folder with its tokenizer, made from a qdistill teacher."""
    from qdistill.data.text import load_python_docs
    from qdistill.export.hf import save_pretrained_dir
    from qdistill.files import cache_dir
    from qdistill.models import load_checkpoint

    folder = work / "my-model"
    if (folder / "model.safetensors").exists():
        return folder
    if not (work / "teacher" / "results.json").exists():
        qdistill("train-teacher", "--task", "lm", "--model", preset, "--epochs", epochs, "--train-subset", tokens, "--seq-len", seq_len, "--run-dir", work / "teacher", "--quiet")
    corpus = load_python_docs(cache_dir(), 8192)
    tokenizer = work / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    (tokenizer / "tokenizer.json").write_bytes(corpus.tokenizer_path.read_bytes())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    save_pretrained_dir(load_checkpoint(work / "teacher" / "teacher.safetensors")[0], folder, overwrite=True, tokenizer_dir=tokenizer)
    return folder


def make_text(work: Path) -> Path:
    """The Python docs as train/validation/test JSON lines, one file per row, split as the teacher's corpus was."""
    from qdistill.data.text import _read, list_text_files, python_docs_dir, split_files

    folder = work / "my-text"
    if (folder / "test.jsonl").exists():
        return folder
    folder.mkdir(exist_ok=True)
    docs = python_docs_dir()
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        rows = [json.dumps({"text": _read(docs / rel), "file": rel}) + "\n" for rel in split_files(list_text_files(docs))[split]]
        (folder / f"{name}.jsonl").write_text("".join(rows))
    return folder


def evaluated(path, text: Path, seq_len: int) -> dict:
    """`qdistill eval` on the whole test file: perplexity, and bits per byte of its text."""
    return json.loads(qdistill("eval", path, "--data", text, "--seq-len", seq_len, "--quiet").splitlines()[-1])


def llama_cpp_check(gguf: Path, packed: Path, text: Path, windows: int, length: int) -> dict | None:
    """llama.cpp's logits on the first test windows against the packed model's: the largest difference over the
    largest logit, and how often the top token agrees. None without node-llama-cpp."""
    import llama_cpp  # bench/llama_cpp.py
    from qdistill import load_packed
    from qdistill.data.model_tokenizer import ModelTokenizer

    if not (HERE / "llama_cpp" / "node_modules" / "node-llama-cpp").exists():
        return None
    tokenizer = ModelTokenizer.find(packed.parent).load()
    ids = []
    for line in (text / "test.jsonl").read_text().splitlines():  # the test files' first windows
        ids += tokenizer.encode(json.loads(line)["text"]).ids
        if len(ids) >= windows * length:
            break
    model = load_packed(packed)[0].eval()
    worst, same, count = 0.0, 0, 0
    for w in range(windows):
        tokens = ids[w * length : (w + 1) * length]
        with torch.no_grad():
            want = model(torch.tensor([tokens])).logits[0]
        got = llama_cpp.llama_cpp_logits(gguf, tokens)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        same, count = same + int((got.argmax(-1) == want.argmax(-1)).sum()), count + len(tokens)
    return {"positions": count, "max_rel_diff": worst, "top1_same": same / count}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-tiny", help="the model made to stand for yours")
    p.add_argument("--teacher-tokens", type=int, default=1_200_000, help="training tokens of the model made")
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--train-tokens", type=int, default=600_000, help="the tutorial's distillation: tokens of the JSON lines' train split")
    p.add_argument("--val-tokens", type=int, default=100_000, help="validation tokens scored after each epoch of the distillation")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-3, 3e-4, 1e-4], help="qd's learning rates, one chosen on validation")
    p.add_argument("--work", type=Path, default=HERE / "results" / "work-own-lm")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from qdistill.report import markdown_table

    args.work.mkdir(parents=True, exist_ok=True)
    model, text = make_model(args.work, args.preset, args.teacher_tokens, args.teacher_epochs, args.seq_len), make_text(args.work)
    common = ["--data", text, "--seq-len", args.seq_len, "--train-subset", args.train_tokens, "--test-subset", args.val_tokens, "--quiet", *Q4_1]
    runs = {"ptq": ("ptq", [])} | {f"qd lr {lr:g}": ("qd", ["--epochs", "1", "--lr", lr]) for lr in args.lrs}
    for label, (method, extra) in runs.items():
        run = args.work / label.replace(" ", "-")
        if not (run / "results.json").exists():
            qdistill("distill", "--teacher", f"hf:{model}", "--init", f"hf:{model}", "--method", method, "--bits", "4", "--run-dir", run, *extra, *common)
    val = {label: json.loads((args.work / label.replace(" ", "-") / "results.json").read_text())["rows"][0]["val_ppl"] for label in runs}
    chosen = min((label for label in runs if label != "ptq"), key=val.get)  # the learning rate, on the validation tokens
    rows = [{"model": f"your model ({args.preset}, float32)", **evaluated(f"hf:{model}", text, args.seq_len),
             "bytes": (model / "model.safetensors").stat().st_size}]
    for label in ("ptq", chosen):
        run = args.work / label.replace(" ", "-")
        result = json.loads((run / "results.json").read_text())["rows"][0]
        packed = run / result["file"]
        rows.append({"model": f"{label} 4 bits (Q4_1 layout)", **evaluated(packed, text, args.seq_len), "bytes": packed.stat().st_size})
        gguf = args.work / f"{label.replace(' ', '-')}.gguf"
        if not gguf.exists():
            qdistill("export", packed, gguf, "--format", "gguf")
        rows[-1]["gguf_bytes"] = gguf.stat().st_size
        rows[-1]["llama_cpp"] = llama_cpp_check(gguf, packed, text, windows=4, length=args.seq_len)
    for r in rows:
        print(json.dumps(r))
    setup = (f"CPU ({platform.machine()}), 2 threads. The model: {args.preset} trained by qdistill train-teacher on the first {args.teacher_tokens:,} "
             f"tokens of the Python docs' training files for {args.teacher_epochs} epochs, exported to a save_pretrained folder with its 8,192-token "
             f"byte-level BPE. The tutorial's distillation: 1 epoch over the first {args.train_tokens:,} tokens of the JSON lines' train split, "
             f"windows of {args.seq_len}; test: all of test.jsonl")
    for r in rows:
        check = r.pop("llama_cpp", None)
        r["llama.cpp"] = f"{check['max_rel_diff']:.1e} / {check['top1_same']:.3f}" if check else None
    columns = [("model", "model", ""), ("test_ppl", "test ppl", ".2f"), ("test_bpb", "bits per byte", ".3f"), ("bytes", "file (bytes)", ","),
               ("gguf_bytes", "GGUF (bytes)", ","), ("llama.cpp", "llama.cpp: logit diff / same top token", "")]
    sweep = "; ".join(f"{label} {v:.2f}" for label, v in val.items())
    md = (f"# Your own Hugging Face LM, the tutorial measured ({args.tag})\n\n{setup}. Validation perplexity (the first {args.val_tokens:,} tokens), "
          f"which chose qd's learning rate: {sweep}.\n\n" + markdown_table(rows, columns) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"own-lm-{args.tag}.json").write_text(json.dumps({"setup": setup, "val_ppl": val, "rows": rows}, indent=1))
    (args.out / f"own-lm-{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE))
    main()

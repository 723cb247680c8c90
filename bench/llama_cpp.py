"""The GGUF export run by llama.cpp itself: the same logits as the packed model?

llama.cpp comes from npm as node-llama-cpp's prebuilt CPU binaries (nothing is compiled here); install it
once with `cd bench/llama_cpp && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --omit=optional`.
For each seed, a gpt-tiny LLaMA student (fresh weights, a vocabulary of --vocab tokens) is quantized to 4
bits in two layouts, saved packed and exported with `qdistill export --format gguf`; and a small random
Hugging Face model of each other architecture GGUF export maps (Mistral, written as LLaMA; Qwen2, its own),
built with transformers, in the Q4_1 layout:

  Q4_1     row blocks of 32 with float16 step and minimum: Q4_1's own form, written as Q4_1 from the levels
  float32  min-max groups of 256 over the flattened tensor: no GGUF block form, written dequantized (F32)

llama.cpp's logits at every position of a random sequence are compared with those of the packed model
loaded dense (float32): the largest difference over the largest logit, and how often the top token is
the same. llama.cpp multiplies Q4_1 weights with activations rounded to 8 bits (Q8_1), so that row is
close, not exact; the float32 row checks the rest of the file (names, the q/k row order, norms, tied head).
Writes bench/results/llama-cpp-<tag>.{json,md}.

    python bench/llama_cpp.py            # a minute or two
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results"
LAYOUTS = {"Q4_1": {"bucket": 32, "groups": "row", "scale_dtype": "float16"}, "float32": {"bucket": 256}}


def llama_cpp_logits(gguf: Path, tokens: list[int]) -> torch.Tensor:
    node = shutil.which("node")
    if node is None or not (HERE / "llama_cpp" / "node_modules" / "node-llama-cpp").exists():
        raise SystemExit("needs Node.js and node-llama-cpp: cd bench/llama_cpp && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --omit=optional")
    run = subprocess.run([node, "logits.mjs", str(gguf), json.dumps(tokens)], cwd=HERE / "llama_cpp", capture_output=True, text=True, check=True)
    return torch.tensor(json.loads(run.stdout.splitlines()[-1])["logits"])


def byte_level_bpe(vocab: int, path: Path) -> Path:
    """A byte-level BPE tokenizer.json of `vocab` tokens, trained on qdistill's own docs: llama.cpp loads a
    vocabulary with the model (the check feeds it token ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(f) for f in sorted((HERE.parent / "docs").glob("*.md"))], trainer)
    if tokenizer.get_vocab_size() != vocab:
        raise SystemExit(f"the docs gave {tokenizer.get_vocab_size()} tokens, not {vocab}: choose a smaller --vocab")
    tokenizer.save(str(path))
    return path


def student(architecture: str, vocab: int):
    """(spec, model) of a fresh gpt-tiny, or of a small random transformers model of `architecture`."""
    from qdistill.models import build_model, hf_spec, model_spec

    if architecture == "gpt-tiny":
        spec = model_spec("gpt-tiny", num_classes=vocab)
        return spec, build_model(spec)
    from transformers import AutoConfig

    config = AutoConfig.for_model(architecture, vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    spec = hf_spec(config, head="causal-lm")
    return spec, build_model(spec)


def check(architecture: str, layout: str, seed: int, vocab: int, length: int, tokenizer: Path, work: Path) -> dict:
    import qdistill
    from qdistill.export.gguf import export_gguf

    torch.manual_seed(seed)
    spec, model = student(architecture, vocab)
    qdistill.attach(model, qdistill.UniformQuantizer(4, **LAYOUTS[layout]))
    path = qdistill.save_packed(model, spec, work / f"{architecture}-{layout}-{seed}.safetensors")
    counts = export_gguf(path, work / f"{architecture}-{layout}-{seed}.gguf", tokenizer)
    tokens = torch.randint(vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.no_grad():
        out = qdistill.load_packed(path)[0](torch.tensor([tokens]))
    want = (out if isinstance(out, torch.Tensor) else out.logits)[0]
    got = llama_cpp_logits(work / f"{architecture}-{layout}-{seed}.gguf", tokens)
    return {"architecture": architecture, "layout": layout, "seed": seed, **counts, "positions": length, "max_rel_diff": float((got - want).abs().max() / want.abs().max()),
            "top1_same": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--length", type=int, default=128, help="tokens in each sequence")
    p.add_argument("--architectures", nargs="+", default=["gpt-tiny", "mistral", "qwen2"], help="gpt-tiny (both layouts) and transformers model types (Q4_1)")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from qdistill.report import markdown_table

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = byte_level_bpe(args.vocab, Path(tmp) / "tokenizer.json")
        jobs = [(a, layout) for a in args.architectures for layout in (LAYOUTS if a == "gpt-tiny" else ["Q4_1"])]
        rows = [check(a, layout, seed, args.vocab, args.length, tokenizer, Path(tmp)) for a, layout in jobs for seed in args.seeds]
    for r in rows:
        print(json.dumps(r))
    version = json.loads((HERE / "llama_cpp" / "node_modules" / "node-llama-cpp" / "package.json").read_text())["version"]
    setup = (f"CPU ({platform.machine()}); llama.cpp from node-llama-cpp {version} (prebuilt); {', '.join(args.architectures)} at 4 bits with fresh weights, "
             f"vocabulary {args.vocab}, {args.length} random tokens per seed, seeds {args.seeds}")
    columns = [("architecture", "architecture", ""), ("layout", "layout", ""), ("seed", "seed", ""), ("q4_1", "Q4_1 tensors", ""), ("float32", "F32 tensors", ""), ("positions", "positions", ""),
               ("max_rel_diff", "largest logit difference / largest logit", ".1e"), ("top1_same", "same top token", ".3f")]
    md = f"# GGUF export in llama.cpp ({args.tag})\n\n{setup}.\n\n" + markdown_table(rows, columns) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"llama-cpp-{args.tag}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    (args.out / f"llama-cpp-{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""The `qdistill` command: a thin layer over the library. User mistakes print one line, no traceback."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
import unicodedata
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from qdistill.errors import QDistillError
from qdistill.export import export_hf
from qdistill.files import replaced_whole, write_text
from qdistill.format import inspect_packed, is_packed, read_packed
from qdistill.models import HF_FACTORY, LM_PRESETS, build_model, hf_spec, is_language_model, load_checkpoint, load_hf, model_spec, vocab_size_of
from qdistill.pipeline import new_run_dir, run_in, run_method
from qdistill.report import markdown_table, plot_history, result_columns
from qdistill.runtime import RUNTIMES, load_packed
from qdistill.tasks import FROM_PRETRAINED, TASKS, generate
from qdistill.tasks.build import NO_REFERENCE, build_task, model_tokenizer, saved_task
from qdistill.train import METHODS, TrainConfig, distributed, read_yaml
from qdistill.train.loop import resolve_device
from qdistill.train.state import Checkpoint, check_intervals
from qdistill.train.config import CHOICES
from qdistill.ui import console, progress_bars

out = Console()


class TerminalLog(logging.Handler):
    """The library's log records as the terminal shows them: a line each on stderr, warnings marked so."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = shown(record.getMessage())
            console.print(Text(f"warning: {line}" if record.levelno >= logging.WARNING else line), soft_wrap=True)
        except Exception:
            self.handleError(record)


TERMINAL_LOG = TerminalLog()


def show_library_log(quiet: bool) -> None:
    """Warnings always; with progress shown, what long work is doing too (tokenizing a corpus, say)."""
    logger = logging.getLogger("qdistill")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if TERMINAL_LOG not in logger.handlers:
        logger.addHandler(TERMINAL_LOG)


def shown(text, lines: bool = False) -> str:
    """`text` as the terminal may show it: control characters (escape sequences that clear the screen or
    move the cursor, carriage returns that overwrite a line) written as \\x.. escapes; give it to rich as a
    `Text`, never as markup. Names and text from a file (tensor names, a model's output) are someone else's.
    `lines`: keep newlines and tabs."""
    keep = "\n\t" if lines else ""
    return "".join(c if c in keep or unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode("ascii") for c in str(text))


def bucket_arg(text: str):
    if text.lower() in ("none", "global"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bucket must be a positive integer or 'global', got {text!r}") from None


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags stay None so the YAML config and the defaults show through."""
    g = p.add_argument_group("training options (also settable in --config YAML, same names with underscores)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = TrainConfig.__dataclass_fields__[f.name].default
        if f.name == "method":
            continue
        if f.name == "bucket":
            g.add_argument(flag, type=bucket_arg, default=argparse.SUPPRESS, help="values per bucket, or 'global' (default 256)")
        elif f.name == "bucket_by_name":
            g.add_argument(flag, action="append", default=None, metavar="GLOB=N", help="the bucket of the tensors so named, instead of --bucket (repeatable; first match wins)")
        elif f.name in ("include", "exclude"):
            g.add_argument(flag, action="append", default=None, metavar="GLOB", help=f"{f.name} tensors by name pattern (repeatable)")
        elif isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})")
        elif f.name in CHOICES:
            g.add_argument(flag, default=None, help=f"{' or '.join(CHOICES[f.name])} (default {default})")
        elif f.name == "lr":
            g.add_argument(flag, type=float, default=None, help="the peak learning rate (default: the task's: 0.05 images, 3e-3 language models, 1e-4 sentence embeddings "
                           "and language models started from an hf: --init)")
        elif f.name == "dropout":
            g.add_argument(flag, type=float, default=None, help="the student's dropout while it trains (default: 0 for the embedding task, else the model's own; YAML null: the model's own)")
        elif f.name == "hidden_states":
            g.add_argument(flag, type=float, default=None, help="embedding task: the weight of the teacher's token states layer by layer beside the pooled embedding (the teacher then runs live; default 0)")
        else:
            g.add_argument(flag, type=float if default is None else type(default), default=None, help="(default off)" if default is None else f"(default {default})")


def config_from(args, defaults: dict | None = None, **fixed) -> TrainConfig:
    """The options of a command: `defaults` (the command's own), then the YAML file, then the flags, then `fixed`."""
    values = dict(defaults or {})
    values.update(read_yaml(args.config) if getattr(args, "config", None) else {})
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None or (f.name == "bucket" and hasattr(args, "bucket")):
            values[f.name] = v
    values.update(fixed)
    return TrainConfig.from_dict(values)


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="let a model file name the Python factory that builds it, and run it (off: files are opened without running any code they name)",
    )


def add_hf_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-head", choices=("causal-lm", "encoder"), help="what to build from an hf:DIR model (default: what its config's architectures say)")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=list(TASKS), help="classification, lm or embedding (default: lm for a language model, embedding for a Hugging Face encoder, else classification)")
    p.add_argument("--dataset", default="fashion-mnist", help="'fashion-mnist' or a hook 'package.module:function' returning a qdistill.data.Dataset")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files (else $QDISTILL_DATA, then Debian's folder)")
    p.add_argument("--train-subset", type=int, help="use only the first N training examples (lm: tokens)")
    p.add_argument("--test-subset", type=int, help="use only the first N test (and validation) examples (lm: tokens)")
    p.add_argument("--val-size", type=int, help="the last N training examples are the validation split (default 5000 for fashion-mnist, 0 for a hook's data)")
    g = p.add_argument_group("language modelling (--task lm)")
    g.add_argument("--text-dir", help="a folder of text files, split by file (default: the Python 3.11 docs of Debian's python3.11-doc)")
    g.add_argument("--data", help="your text as a datasets folder (save_to_disk) or .jsonl, .json, .csv, .parquet or .txt files (a file, or a folder of them; train/validation/test by file name)")
    g.add_argument("--text-field", default="text", help="with --data: the column that holds the text (default: text)")
    g.add_argument("--token-files", nargs=3, metavar=("TRAIN", "VAL", "TEST"), help="your own token ids (.npy, or .bin of uint16) instead of text")
    g.add_argument("--tokenizer", help="the tokenizer that encodes the text: a model's folder with its tokenizer.json (default: the hf: teacher's or student's own); "
                   "with --token-files: their tokenizer.json (for generate); embedding: the teacher's")
    g.add_argument("--vocab-size", type=int, help="byte-level BPE vocabulary trained on the text's train split, for models without a tokenizer (default 8192)")
    g.add_argument("--seq-len", type=int, help="tokens per training window (default 128)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


DATA_SIZES = {"train_subset": 1, "test_subset": 1, "val_size": 0, "seq_len": 1}  # the least each may be


def check_data_sizes(args) -> None:
    """The data options' sizes, before any data are read (0 would otherwise read as "all")."""
    for name, least in DATA_SIZES.items():
        value = getattr(args, name, None)
        if value is not None and not least <= value <= 1 << 40:
            raise QDistillError(f"--{name.replace('_', '-')} must be at least {least} (and at most 2**40), got {value}")


def task_name(args, *models) -> str:
    """--task, else embedding for a Hugging Face encoder, lm when a model named (a preset, an hf: directory,
    a file's spec, or the task a file was trained on) is a language model, else classification."""
    specs = [hf_spec(m.removeprefix("hf:"), getattr(args, "hf_head", None)) if isinstance(m, str) and m.startswith("hf:") else m for m in models if m]
    if args.task:
        return args.task
    if any(isinstance(m, dict) and (m.get("task") == "embedding" or m.get("factory") == HF_FACTORY and m["kwargs"]["head"] == "encoder") for m in specs):
        return "embedding"
    lm = any((m in LM_PRESETS) if isinstance(m, str) else is_language_model(m) or m.get("task") == "lm" for m in specs)
    return "lm" if lm else "classification"


DEFAULT_MODELS = {"classification": ("tiny", "resnet-small"), "lm": ("lstm-tiny", "lstm-small")}  # (student, teacher)
DATA_OPTIONS = ("dataset", "data_dir", "val_size", "train_subset", "test_subset", "text_dir", "data", "text_field", "token_files", "tokenizer", "vocab_size", "seq_len", "teacher")


def task_from(args, name: str, reference: nn.Module | None = None, models: tuple = ()):
    """The task a command runs, from its data flags (`tasks.build.build_task`). A language model's text is
    tokenized with the tokenizer `models` (hf: directories, model files) bring, or --tokenizer's."""
    check_data_sizes(args)
    options = {k: getattr(args, k) for k in DATA_OPTIONS if getattr(args, k, None) is not None}
    if name == "lm" and not args.token_files:
        tokenizer, vocab = model_tokenizer(models, options.pop("tokenizer", None))
        if tokenizer is not None:
            if args.vocab_size is not None and args.vocab_size != vocab:
                raise QDistillError(f"--vocab-size {args.vocab_size}: the text is tokenized with the tokenizer of {tokenizer.folder}, and the model embeds {vocab} tokens: leave --vocab-size out")
            options.update(model_tokenizer=tokenizer, vocab_size=vocab)
    return build_task(name, reference, **options)


def load_any(path: str, spec: dict | None = None, trust_code: bool = False, hf_head: str | None = None, runtime: str = "dense", tune_batch: int | None = None):
    """A packed model (as its quantized weights), a full-precision checkpoint, or hf:DIR (a Hugging Face
    save_pretrained directory, with its weights), and the spec it was built from.

    `spec` is the user's own (from --model/--student: built as given); without it the file's spec is
    used, which is code-free unless the user passed --trust-code. An hf: directory brings its own.
    `runtime` "kernels": a packed model kept packed, on low-bit kernels (`load_packed`, with `tune_batch`)."""
    if runtime != "dense" and (path.startswith("hf:") or (Path(path).is_file() and not is_packed(path))):  # a missing file: the loaders say so
        raise QDistillError(f"--runtime {runtime} runs packed models (from qdistill distill); {path} is not one")
    if path.startswith("hf:"):
        model, own = load_hf(path.removeprefix("hf:"), hf_head)
        if spec is not None and spec != own:
            raise QDistillError(f"{path} brings its own architecture: leave out --student/--model (or name the same directory)")
        return model, own
    model = build_model(spec) if spec is not None else None
    if is_packed(path):
        loaded, meta = load_packed(path, model=model, trust_code=trust_code, runtime=runtime, tune_batch=tune_batch)
        return loaded, spec or meta["spec"]
    return load_checkpoint(path, spec=spec, model=model, trust_code=trust_code)


def show_rows(rows: list[dict], title: str, metric: str = "acc") -> None:
    table = Table(title=title)
    columns = result_columns(metric)
    for _, header, _ in columns:
        table.add_column(header)
    for row in rows:
        table.add_row(*["" if row.get(k) is None else format(row[k], fmt) for k, _, fmt in columns])
    out.print(table)


def cmd_train_teacher(args) -> None:
    name = task_name(args, args.model)
    if name == "embedding":
        raise QDistillError("an embedding task's teacher is a pretrained sentence encoder: pass it to distill as --teacher hf:DIR")
    args.model = args.model or DEFAULT_MODELS[name][1]
    cfg = config_from(args, defaults=TASKS[name], method="fp")
    resolve_device(cfg.device)  # before any work: a device this machine lacks
    with distributed.main_first():  # under torchrun rank 0 prepares (and caches) the data, the others read it
        task = task_from(args, name)
    spec = model_spec(args.model, **task.spec_args(), hf_head=args.hf_head)
    made = not (args.run_dir and os.path.lexists(args.run_dir))
    run_dir = distributed.on_main(new_run_dir, args.run_dir, "teacher")
    with run_in(run_dir, made), progress_bars(args.quiet or not distributed.is_main()) as progress:
        row, _ = run_method("teacher", spec, task, cfg, run_dir, progress=progress)
    if not distributed.is_main():  # under torchrun rank 0 writes the results
        return
    write_text(run_dir / "results.json", json.dumps({"rows": [row], "config": cfg.to_dict()}, indent=1))
    plot_history(run_dir / "metrics.jsonl", run_dir / "training.png", f"teacher {args.model}", task.metric)
    show_rows([row], f"teacher {args.model}", task.metric)
    out.print(f"teacher saved to {run_dir / row['file']}")


RUN_ARGS = "run.json"  # what a distill run was asked to do, so that --resume can do it again
FILE_ARGS = ("teacher", "init", "config", "data_dir", "text_dir", "data", "tokenizer", "token_files")
MODEL_ARGS = ("student", "teacher_model")  # presets, or hf: directories (files)


def distill_options() -> dict[str, argparse.Action]:
    """The options of `qdistill distill`, by destination."""
    parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["distill"]
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def fits_option(action: argparse.Action, value) -> bool:
    """Whether `value` is one the option could hold after argparse read a command line: run.json is data
    from whoever wrote the directory, checked as a command line would be."""
    if value is None:
        return True
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        return isinstance(value, bool)
    if action.nargs is not None or isinstance(action, argparse._AppendAction):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if action.type is int or action.type is bucket_arg:
        return isinstance(value, int) and not isinstance(value, bool)
    if action.type is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, str) and (action.choices is None or value in action.choices)


def named_code(args: argparse.Namespace, trust_code: bool) -> list[str]:
    """What in a distill run's arguments would import or run code: a model factory, a dataset hook, and
    `trust_code` (the run's --trust-code: factories its model files name)."""
    code = [f"--{key.replace('_', '-')} {args_value}" for key in ("student", "teacher_model") if (args_value := getattr(args, key)) and ":" in args_value and not args_value.startswith("hf:")]
    if args.dataset != "fashion-mnist":
        code.append(f"--dataset {args.dataset}")
    return code + (["--trust-code (factories named in its model files)"] if trust_code else [])


def resumed_args(run_dir: Path, trust_code: bool) -> tuple[argparse.Namespace, TrainConfig]:
    """The arguments and config of the killed run in `run_dir`; a finished or foreign directory is refused.

    A run directory may come from someone else (a colleague's preempted job, a downloaded checkpoint): its
    run.json is read as data, each value checked as the command line would check it, and code it names (a
    factory, a dataset hook, --trust-code) runs only with the resuming user's own --trust-code."""
    if not (run_dir / RUN_ARGS).is_file() or not (run_dir / "config.yaml").is_file():
        raise QDistillError(f"{run_dir} is not the directory of a `qdistill distill` run (no {RUN_ARGS}): nothing to resume")
    if os.path.lexists(run_dir / "results.json"):
        raise QDistillError(f"{run_dir} holds a finished run (results.json): nothing to resume; start a new run with another --run-dir")
    damaged = QDistillError(f"{run_dir / RUN_ARGS} is damaged or not written by qdistill distill: cannot resume")
    try:
        saved = json.loads((run_dir / RUN_ARGS).read_text())
    except (OSError, ValueError, RecursionError):
        raise damaged from None
    options = distill_options()
    if not isinstance(saved, dict) or saved.pop("command", None) != "distill" or set(saved) - set(options) - {"func"}:
        raise damaged
    asked_trust = saved.get("trust_code") is True
    saved = {k: v for k, v in saved.items() if k not in ("func", "resume", "trust_code", "run_dir")}
    wrong = next((k for k, v in saved.items() if not fits_option(options[k], v)), None)
    if wrong is not None:
        raise QDistillError(f"{run_dir / RUN_ARGS}: {wrong} is {saved[wrong]!r}, not a value of --{wrong.replace('_', '-')}: a damaged or crafted run directory, cannot resume")
    defaults = {k: a.default for k, a in options.items() if a.default is not argparse.SUPPRESS}  # an option added since keeps its default
    args = argparse.Namespace(**{**defaults, **saved, "resume": str(run_dir), "run_dir": str(run_dir), "trust_code": trust_code})
    code = named_code(args, asked_trust)
    if code and not trust_code:
        raise QDistillError(f"{run_dir / RUN_ARGS} asks to run code: {'; '.join(code)}. Resume with --trust-code only if you trust whoever wrote {run_dir}")
    return args, TrainConfig.from_dict(read_yaml(run_dir / "config.yaml"))


def resolved(path):
    """Absolute path(s), hf: kept in front, so that --resume from another directory reads the same files."""
    if isinstance(path, list):
        return [resolved(p) for p in path]
    prefix = "hf:" if path.startswith("hf:") else ""
    return prefix + str(Path(path.removeprefix(prefix)).resolve())


def start_distill_run(args, cfg: TrainConfig) -> Path:
    """A new run directory holding what the run was asked to do (for --resume)."""
    run_dir = new_run_dir(args.run_dir, f"distill-{cfg.method}")
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    saved = {k: v for k, v in vars(args).items() if k not in ("func", "resume")}
    saved.update({k: resolved(saved[k]) for k in FILE_ARGS if saved.get(k)})
    saved.update({k: resolved(saved[k]) for k in MODEL_ARGS if (saved.get(k) or "").startswith("hf:")})
    write_text(run_dir / RUN_ARGS, json.dumps({"command": "distill", **saved}, indent=1))
    return run_dir


def cmd_distill(args) -> None:
    check_intervals(args.checkpoint_steps, args.checkpoint_minutes)  # before any work
    if args.resume:
        run_dir = Path(args.resume)
        args, cfg = resumed_args(run_dir, args.trust_code)
    files = [f if f.startswith("hf:") else saved_task(f) for f in (args.init, args.teacher) if f]  # an hf: directory's config says
    name = task_name(args, args.student, args.teacher_model, *files)
    if not args.resume:
        pretrained = FROM_PRETRAINED.get(name, {}) if (args.init or "").startswith("hf:") else {}
        cfg = config_from(args, defaults=TASKS[name] | pretrained, method=args.method)
    resolve_device(cfg.device)  # before any work: a device this machine lacks
    if (cfg.relational or cfg.hidden_states) and name != "embedding":
        raise QDistillError(f"--relational and --hidden-states weigh sentence embeddings' similarities and token states; the {name} task has none: leave them out")
    reference = init = spec = None
    if name == "embedding" and args.teacher:  # the task scores against the teacher; the student is its copy unless told
        reference, reference_spec = load_any(args.teacher, None, args.trust_code, args.hf_head)
        if not (args.student or args.init):
            init, spec = copy.deepcopy(reference), reference_spec
    with distributed.main_first():  # under torchrun rank 0 prepares (and caches) the data, the others read it
        task = task_from(args, name, reference, (args.teacher, args.init, args.student))
    method = cfg.spec
    if args.student:
        spec = model_spec(args.student, **task.spec_args(), hf_head=args.hf_head)
    if args.init:
        init, spec = load_any(args.init, spec, args.trust_code, args.hf_head)
    spec = spec or model_spec(DEFAULT_MODELS[name][0], **task.spec_args())
    if method.trains != "weights" and init is None:
        raise QDistillError(f"method {cfg.method} does not train the weights: give trained ones with --init")
    teacher = None
    if cfg.needs_teacher:
        if not args.teacher:
            raise QDistillError(f"method {cfg.method} distills from a teacher: give --teacher FILE (from `qdistill train-teacher`)")
        teacher_spec = model_spec(args.teacher_model, **task.spec_args(), hf_head=args.hf_head) if args.teacher_model else None
        teacher = reference or load_any(args.teacher, teacher_spec, args.trust_code, args.hf_head)[0]
    made = not (args.run_dir and os.path.lexists(args.run_dir))  # (a resumed run's directory is never removed)
    if not args.resume:
        run_dir = distributed.on_main(start_distill_run, args, cfg)
    own = task.corpus.model_tokenizer if name == "lm" else None
    if own is not None and distributed.is_main():  # beside the model it writes, as in a save_pretrained directory: eval, generate and export find it
        own.copy_to(run_dir)
    state = run_dir / "state.pt"
    with contextlib.nullcontext() if args.resume else run_in(run_dir, made), progress_bars(args.quiet or not distributed.is_main()) as progress:
        checkpoint = Checkpoint(state, args.checkpoint_steps, args.checkpoint_minutes, log_path=run_dir / "metrics.jsonl")
        row, _ = run_method(cfg.method, spec, task, cfg, run_dir, teacher=teacher, init=init, progress=progress, checkpoint=checkpoint)
    if not distributed.is_main():  # under torchrun rank 0 writes the results
        return
    write_text(run_dir / "results.json", json.dumps({"rows": [row], "config": cfg.to_dict()}, indent=1))
    state.unlink(missing_ok=True)  # finished: the results and the model are what is kept
    title = f"{cfg.method} on {model_name(spec)}"
    plot = plot_history(run_dir / "metrics.jsonl", run_dir / "training.png", title, task.metric)
    report = f"# qdistill distill --method {cfg.method}\n\n" + markdown_table([row], result_columns(task.metric)) + "\n"
    if plot:
        report += "\n![training](training.png)\n"
    write_text(run_dir / "report.md", report)
    show_rows([row], title, task.metric)
    out.print(f"model saved to {run_dir / row['file']}")


def model_name(spec: dict) -> str:
    """A preset's size, a Hugging Face model's architecture, else the factory."""
    kwargs = spec.get("kwargs", {})
    if spec.get("factory") == HF_FACTORY:
        return (kwargs["config"].get("architectures") or [kwargs["config"].get("model_type", "transformers model")])[0]
    return kwargs.get("size", spec["factory"])


def file_task(args) -> str | None:
    """The task of args.file as --task, an hf: directory's config or a model file's saved task says (None: it does not say)."""
    return task_name(args, args.file) if args.file.startswith("hf:") else args.task or saved_task(args.file).get("task")


def model_and_task(args, require_lm: bool = False):
    """The model in args.file and the task it is evaluated on: lm when the file holds a language model,
    with its vocabulary and window length unless flags say otherwise."""
    saved = saved_task(args.file)
    said = file_task(args)  # before any weights load
    if require_lm and said == "embedding":
        raise QDistillError(f"{args.file} is a sentence encoder, not a language model: generate samples text from one")
    if args.file.startswith("hf:") and said == "lm" and not (args.token_files or args.vocab_size or args.tokenizer or model_tokenizer((args.file,))[0]):
        raise QDistillError(f"{args.file} has no tokenizer.json: give the tokenizer of its text (--tokenizer DIR), or token ids made with it (--token-files TRAIN VAL TEST --vocab-size N)")
    if said == "embedding" and not getattr(args, "teacher", None):
        raise QDistillError(NO_REFERENCE)
    if saved.get("task") == "embedding" and args.seq_len is None:
        args.seq_len = saved.get("max_len")  # evaluated as trained
    if saved.get("task") == "lm":
        args.vocab_size = args.vocab_size if args.vocab_size is not None else saved.get("vocab_size")
        args.seq_len = args.seq_len if args.seq_len is not None else saved.get("seq_len")
        corpus = saved.get("corpus")
        if corpus not in (None, "python-docs") and not (args.text_dir or args.data or args.token_files):
            raise QDistillError(f"{args.file} was trained on the corpus {corpus!r}, not the Python docs: give its data again (--text-dir, --data or --token-files)")

    def task_named(name: str):
        if require_lm and name != "lm":  # refused before any data are read
            raise QDistillError(f"{args.file} is not a language model: generate samples text from one (or pass --task lm)")
        teacher = getattr(args, "teacher", None)  # an embedding model is scored against its teacher
        reference = load_any(teacher, None, args.trust_code, args.hf_head)[0] if name == "embedding" and teacher else None
        return task_from(args, name, reference, (args.file,))

    # the caller's architecture is sized by the data, so its task comes first; else the file's spec says
    task = task_named(task_name(args, args.model, saved)) if args.model else None
    runtime = getattr(args, "runtime", "dense")
    spec = model_spec(args.model, **task.spec_args(), hf_head=args.hf_head) if task else None
    model, spec = load_any(args.file, spec, args.trust_code, args.hf_head, runtime, getattr(args, "tune_batch", None))
    if task is None:
        if args.vocab_size is None and is_language_model(spec):
            args.vocab_size = vocab_size_of(spec)
        task = task_named(task_name(args, spec, saved))
    return model.to("cpu" if runtime == "kernels" else resolve_device("auto")), task  # the kernels are CPU ones


def cmd_eval(args) -> None:
    model, task = model_and_task(args)
    metrics = task.evaluate(model, "test")
    print(json.dumps({"file": args.file, **{f"test_{k}": v for k, v in metrics.items()}}))


def cmd_generate(args) -> None:
    for name, low, high in (("tokens", 1, 100_000), ("samples", 1, 1000), ("top_k", 0, 1 << 20), ("temperature", 0, 100), ("seed", 0, 2**32 - 1001)):
        if not low <= getattr(args, name) <= high:  # (a NaN is no number from low to high)
            raise QDistillError(f"--{name.replace('_', '-')} must be from {low} to {high}, got {getattr(args, name)}")
    own = model_tokenizer((args.file,), args.tokenizer)[0] if not (args.token_files or args.model) and file_task(args) == "lm" else None
    if own is not None:  # the model's own tokenizer: no text to read
        model = load_any(args.file, None, args.trust_code, args.hf_head)[0].to(resolve_device("auto"))
        tokenizer, context = own.load(), args.seq_len or saved_task(args.file).get("seq_len") or 128
    else:
        model, task = model_and_task(args, require_lm=True)
        tokenizer, context = task.corpus.tokenizer(), task.seq_len
    prompt = tokenizer.encode(args.prompt).ids
    if not prompt:
        raise QDistillError("the prompt is empty: give some text with --prompt")
    for i in range(args.samples):
        ids = generate(model, prompt, args.tokens, args.temperature, args.top_k, seed=args.seed + i, context=context)
        out.print(Text.assemble((shown(args.prompt, lines=True), "bold"), shown(tokenizer.decode(ids[len(prompt) :]), lines=True)), highlight=False)


def cmd_inspect(args) -> None:
    info = inspect_packed(args.file)
    if args.json:
        print(json.dumps(info, indent=1))
        return
    table = Table(title=Text(shown(args.file)), show_header=False)
    fmt = {
        "fp32_bytes": "{:,} B", "disk_bytes": "{:,} B", "theoretical_bytes": "{:,} B", "huffman_bytes": "{:,} B",
        "overhead_pct": "{:.2f} %", "ratio_vs_fp32": "{:.2f}x", "nominal_ratio_quantized": "{:.2f}x",
        "huffman_ratio_vs_fp32": "{:.2f}x", "huffman_bits_per_weight": "{:.3f}",
    }
    for key, value in info.items():
        if key not in ("file", "info"):
            table.add_row(key, Text(shown(fmt.get(key, "{}").format(value))))
    out.print(table)


def cmd_export(args) -> None:
    if args.format == "onnx":
        return export_onnx_file(args)
    if args.format == "gguf":
        return export_gguf_file(args)
    tokenizer = args.tokenizer or own_tokenizer(args.file)
    out_dir = export_hf(args.file, args.out_dir, overwrite=args.overwrite, tokenizer_dir=tokenizer)
    written = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    out.print(f"Hugging Face model written to {out_dir}/ ({written:,} bytes; the packed file: {Path(args.file).stat().st_size:,} bytes)")
    if not tokenizer:
        out.print("no tokenizer copied: add --tokenizer DIR (the teacher's directory) for AutoTokenizer to open it too")


def own_tokenizer(path: str) -> Path | None:
    """The folder of the tokenizer a packed file was trained with, which its run copied beside it (None: it had none)."""
    tokenizer, _ = model_tokenizer((path,))
    return tokenizer.folder if tokenizer is not None else None


@contextlib.contextmanager
def written_in_place(target: Path, overwrite: bool):
    """A temporary path beside `target` (`replaced_whole`), renamed to it when the block ends without error:
    an existing `target` is refused unless `overwrite`, and a failed export leaves it as it was."""
    if os.path.lexists(target) and not overwrite:
        raise QDistillError(f"{target} exists: give another path or --overwrite (nothing was written)")
    if target.is_dir():
        raise QDistillError(f"{target} is a directory: give the path of the file to write (nothing was written)")
    if not target.parent.is_dir():
        raise QDistillError(f"{target.parent} is not a directory: make it first, or write elsewhere (nothing was written)")
    with replaced_whole(target) as tmp:
        yield tmp


ONNX_TOLERANCE = 1e-4  # ONNX Runtime against the packed model, relative to the largest output (measured: 1e-6 and under)


def export_onnx_file(args) -> None:
    """The packed file as an ONNX graph (MatMulNBits for row-grouped Linear weights), checked with ONNX Runtime
    on a random input before it is put in place."""
    from qdistill.export.onnx import check_with_onnxruntime, export_onnx, require_onnxruntime, signature

    target = Path(args.out_dir)
    require_onnxruntime()
    meta, _ = read_packed(args.file)
    architecture = lambda: build_model(model_spec(args.model)) if args.model else None  # noqa: E731
    sig = signature(meta.get("info", {}).get("task", {}), meta.get("spec") or {}, args.image_size)
    with written_in_place(target, args.overwrite) as tmp:
        info = export_onnx(args.file, tmp, sig["sample"], sig["head"], sig["input_names"], sig["output_name"], sig["dynamic"], model=architecture(),
                           trust_code=args.trust_code, accuracy_level=args.accuracy_level)
        dense = load_packed(args.file, model=architecture(), trust_code=args.trust_code)[0]
        with torch.no_grad():
            expected = (sig["head"] or (lambda m, *x: m(*x)))(dense, *sig["probe"]).float()
        got = check_with_onnxruntime(tmp, sig["probe"], sig["input_names"])
        error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)
        if args.accuracy_level == 0 and not error <= ONNX_TOLERANCE:
            raise QDistillError(f"ONNX Runtime's output is {error:.1e} away from the packed model's (more than {ONNX_TOLERANCE:.0e}): not written")
    out.print(f"ONNX model written to {target} ({info['bytes']:,} bytes; {info['matmul_nbits']} weights as MatMulNBits, {info['gather_block_quantized']} tables as GatherBlockQuantized, {info['float32']} in float32); "
              f"ONNX Runtime's output on a random input is within {error:.1e} of the packed model's (relative to its largest value)")


def export_gguf_file(args) -> None:
    """A LLaMA, Mistral or Qwen2 packed model as GGUF (Q4_1 where the levels are Q4_1's), read back with the gguf package."""
    from qdistill.export.gguf import export_gguf, gguf_difference

    target = Path(args.out_dir)
    tokenizer = args.tokenizer or own_tokenizer(args.file)
    tokenizer = Path(tokenizer) / "tokenizer.json" if tokenizer and Path(tokenizer).is_dir() else tokenizer
    with written_in_place(target, args.overwrite) as tmp:
        counts = export_gguf(args.file, tmp, tokenizer)
    worst = gguf_difference(target, args.file)
    out.print(f"GGUF model written to {target} ({target.stat().st_size:,} bytes; {counts['q4_1']} tensors as Q4_1, {counts['float32']} in float32); "
              f"the gguf package reads every weight back within {worst:.1e} of the packed model's")
    if not tokenizer:
        out.print("no tokenizer written: add --tokenizer TOKENIZER.JSON (the model's own) for llama.cpp to run it")


def cmd_demo(args) -> None:
    from qdistill.demo import DEMO_CONFIG, DEMOS, FULL, QUICK, run_demo
    from qdistill.pipeline import check_workers

    start = time.perf_counter()
    check_workers(args.workers)  # before the data are read
    name = task_name(args, args.student, args.teacher)
    for key, value in DEMOS[name].items():  # the task's demo settings, where no flag says otherwise
        if getattr(args, key) is None:
            setattr(args, key, value)
    cfg = config_from(args, defaults={**TASKS[name], **DEMO_CONFIG[name], "epochs": (FULL if args.full else QUICK)["epochs"]}, method="qd")
    task = task_from(args, name)
    run_dir = new_run_dir(args.run_dir, "demo")
    rows = run_demo(task, run_dir, args.student, args.teacher, args.teacher_epochs, args.bit_widths, cfg, args.quiet, args.full, args.workers)
    show_rows(rows, f"qdistill demo ({time.perf_counter() - start:.0f} s)", task.metric)
    out.print(f"report, plots and packed models in {run_dir}/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdistill", description="Compress PyTorch models by quantized distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-teacher", help="train a full-precision teacher")
    p.add_argument("--model", help="preset, hf:DIR (a Hugging Face config.json there; fresh weights) or package.module:factory (default resnet-small; --task lm: lstm-small)")
    add_hf_flag(p)
    p.add_argument("--run-dir")
    p.add_argument("--config", help="YAML file of training options")
    add_data_flags(p)
    add_config_flags(p)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("distill", help="train a student with one method (fp, kd, ptq, qat, qd, dq, qd+dq)")
    p.add_argument("--method", choices=list(METHODS), default=None, help="(default qd)")
    p.add_argument("--student", help="preset (tiny, small, medium, large), hf:DIR (a Hugging Face config.json there; fresh weights) or package.module:factory (default: the --init file's model, else tiny)")
    p.add_argument("--teacher", help="teacher checkpoint (.safetensors from train-teacher), or hf:DIR (a Hugging Face save_pretrained directory, with its weights)")
    p.add_argument("--teacher-model", help="the teacher's architecture (preset, hf:DIR or package.module:factory) when its file holds a model of your own")
    p.add_argument("--init", help="start from these student weights (needed by ptq and dq); a file, or hf:DIR with its weights")
    add_hf_flag(p)
    add_trust_flag(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the killed run in RUN_DIR with its own options (other flags are ignored)")
    p.add_argument("--checkpoint-steps", type=int, help="save the run's whole state every N steps (for --resume)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="... and every M minutes (default 5)")
    p.add_argument("--run-dir")
    p.add_argument("--config", help="YAML file of training options")
    add_data_flags(p)
    add_config_flags(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="test accuracy (lm: perplexity, bits per byte; embedding: agreement with the teacher) of a packed model, a checkpoint or hf:DIR")
    p.add_argument("file")
    p.add_argument("--model", help="the file's architecture, a preset, hf:DIR or package.module:factory (for a plain state dict or a model of your own)")
    p.add_argument("--teacher", help="embedding models: the teacher (hf:DIR) their embeddings are compared with")
    p.add_argument("--runtime", choices=RUNTIMES, default="dense", help="dense: float32 weights (default); kernels: a packed model's weights kept packed, on low-bit CPU kernels where they fit (docs/inference.md)")
    p.add_argument("--tune-batch", type=int, help="with --runtime kernels: run each layer shape the way that was fastest at this many rows on this machine (timed once, kept in the cache): on a kernel or dense (float32, more memory)")
    add_hf_flag(p)
    add_trust_flag(p)
    add_data_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a packed (or full-precision) language model")
    p.add_argument("file")
    p.add_argument("--prompt", default="The ", help="text to continue")
    p.add_argument("--tokens", type=int, default=60, help="tokens to sample (default 60)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 takes the most likely token (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50)")
    p.add_argument("--samples", type=int, default=1, help="how many continuations (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="the file's architecture, a preset, hf:DIR or package.module:factory (for a plain state dict or a model of your own)")
    add_hf_flag(p)
    add_trust_flag(p)
    add_data_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="sizes of a packed model: fp32, on disk, nominal, Huffman estimate")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write a packed model in another format: hf, a Hugging Face save_pretrained directory (dequantized); onnx, for ONNX Runtime (low-bit Linear weights); gguf, for llama.cpp (LLaMA, Mistral and Qwen2 models, Q4_1)")
    p.add_argument("file", help="a packed model (hf: a Hugging Face architecture, an hf: student or a gpt-* preset)")
    p.add_argument("out_dir", metavar="OUT", help="hf: a directory; onnx: the .onnx file")
    p.add_argument("--format", choices=("hf", "onnx", "gguf"), default="hf", help="(default hf)")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it exists (hf: transformers' own files are replaced, others kept)")
    p.add_argument("--tokenizer", metavar="DIR", help="hf: copy the tokenizer files of DIR (the teacher's hf: directory) beside the model; gguf: the model's tokenizer.json (or its DIR); default: the tokenizer its run copied beside FILE")
    p.add_argument("--accuracy-level", type=int, default=0, help="onnx: MatMulNBits' accuracy_level; 4 computes with int8 activations, faster and less exact (default 0)")
    p.add_argument("--image-size", type=int, default=28, help="onnx, image classifiers: the input's height and width (default 28)")
    p.add_argument("--model", help="onnx: the file's architecture, for a model of your own (package.module:factory)")
    p.add_argument("--trust-code", action="store_true", help="onnx: let the file name the Python factory that builds it, and run it")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="fp, kd, ptq, qat, qd and the improved qd at 4 and 2 bits on Fashion-MNIST (--full: everything; --task lm: a language model)")
    p.add_argument("--full", action="store_true", help="every method (dq, qd+dq, improved qat too), 8/4/3/2 bits, 3 seeds")
    p.add_argument("--workers", type=int, default=2, help="methods trained side by side, each on its share of the CPU threads (default 2)")
    p.add_argument("--student", help="(default tiny; --task lm: lstm-tiny)")
    p.add_argument("--teacher", help="(default resnet-small, the shipped one; --task lm: lstm-small)")
    p.add_argument("--teacher-epochs", type=int, help="(default 3; --task lm: 1)")
    p.add_argument("--bit-widths", type=int, nargs="+", help="bit widths to compare (default 4 2; with --full 8 4 3 2)")
    p.add_argument("--run-dir")
    p.add_argument("--config", help="YAML file of training options")
    add_data_flags(p)
    add_config_flags(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars, beside ours, per file loaded
    args = build_parser().parse_args(argv)
    if getattr(args, "method", "x") is None:
        args.method = "qd"
    show_library_log(getattr(args, "quiet", False))
    try:
        if distributed.launched():
            if args.func not in (cmd_distill, cmd_train_teacher):
                raise QDistillError("only distill and train-teacher run under torchrun (one process per device); run the other commands as one process")
            distributed.join()
        args.func(args)
    except QDistillError as e:
        rank = distributed.launched_rank()  # under torchrun: rank 0 prints, another rank only an error of its own
        if rank == 0 or not isinstance(e, distributed.RelayedError):
            print(f"qdistill: error: {shown(e)}" if rank == 0 else f"qdistill: error (rank {rank}): {shown(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdistill: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())

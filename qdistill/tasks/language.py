"""Next-token language modelling on a token stream that need not fit in memory.

The stream (a memory-mapped array of token ids, `data.text.TokenCorpus`) is cut into fixed windows of
`seq_len` tokens, each predicting its next `seq_len` tokens; the last window is padded, its padding
labelled -100 and left out of the loss and the metrics. An epoch visits every training window once,
in an order that is a function of (seed, epoch) alone, as for images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from qdistill.distill import LiveTeacher, distillation_loss
from qdistill.distill.teacher import TopKTeacher
from qdistill.data import epoch_order
from qdistill.errors import QDistillError
from qdistill.modes import evaluating

IGNORE = -100


def logits_of(output) -> torch.Tensor:
    """A model's logits: the tensor it returns, or the `.logits` of a Hugging Face output."""
    return getattr(output, "logits", output)


def embedded_tokens(model: nn.Module) -> int | None:
    """How many token ids the model has input embeddings for: a Hugging Face model's input embeddings, else its
    one embedding table (nn.Embedding, the kernel runtime's LowBitEmbedding); None when that is unclear (several)."""
    get = getattr(model, "get_input_embeddings", None)
    tables = [get()] if callable(get) else [m for m in model.modules() if isinstance(getattr(m, "num_embeddings", None), int)]
    return tables[0].num_embeddings if len(tables) == 1 and tables[0] is not None else None


def positions(model: nn.Module) -> int | None:
    """How many positions a Hugging Face model has (its config's max_position_embeddings); None for other models."""
    longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return longest if isinstance(longest, int) else None


def vocabulary_mismatch(what: str, tokens: int, vocab_size: int) -> QDistillError:
    return QDistillError(
        f"the model {what} {tokens} tokens, the data have a vocabulary of {vocab_size}: "
        "give token files made with the model's tokenizer and its size (--token-files ... --vocab-size N)"
    )


class LanguageModelling:
    name = "lm"
    metric = "ppl"

    def __init__(self, corpus, seq_len: int = 128, eval_batch_size: int = 32):
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 2 <= seq_len <= 1 << 16:
            raise QDistillError(f"seq_len must be an integer from 2 to 65536, got {seq_len!r}")
        self.corpus, self.seq_len, self.eval_batch_size = corpus, seq_len, eval_batch_size
        for split in ("train", "val", "test"):
            if len(corpus.split(split)) < 2:
                raise QDistillError(f"corpus {corpus.name!r}: the {split} split has fewer than 2 tokens")

    def windows(self, split: str) -> int:
        return math.ceil((len(self.corpus.split(split)) - 1) / self.seq_len)

    def train_size(self) -> int:
        return self.windows("train")

    def describe(self) -> dict:
        """What a saved model needs to be evaluated as trained: kept in its file."""
        described = {"task": self.name, "seq_len": self.seq_len, "vocab_size": self.corpus.vocab_size, "corpus": self.corpus.name}
        own = self.corpus.model_tokenizer  # a model's own, found beside the file by its key
        return described | ({"tokenizer": own.key} if own is not None else {})

    def data_key(self) -> str:
        return f"{self.corpus.key}-{self.seq_len}"

    def spec_args(self) -> dict:
        return {"num_classes": self.corpus.vocab_size}

    def batch(self, split: str, rows) -> dict:
        """Windows `rows` of a split: inputs, next-token labels (-100 on padding) and the window indices."""
        tokens, length = self.corpus.split(split), self.seq_len
        x = np.zeros((len(rows), length), dtype=np.int64)
        y = np.full((len(rows), length), IGNORE, dtype=np.int64)
        for j, i in enumerate(rows):
            chunk = np.asarray(tokens[i * length : (i + 1) * length + 1], dtype=np.int64)
            x[j, : len(chunk) - 1], y[j, : len(chunk) - 1] = chunk[:-1], chunk[1:]
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "index": torch.as_tensor(rows, dtype=torch.int64)}

    def ordered_batches(self, split: str, batch_size: int):
        n = self.windows(split)
        for start in range(0, n, batch_size):
            yield self.batch(split, list(range(start, min(start + batch_size, n))))

    def train_batch(self, epoch: int, position: int, cfg) -> dict:
        rows = epoch_order(self.train_size(), cfg.seed, epoch)[position * cfg.batch_size : (position + 1) * cfg.batch_size]
        return self.batch("train", rows.tolist())

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The logits; a model whose vocabulary is not the data's is refused (a Hugging Face model brings its
        own: a wider one would also overflow the teacher cache's 16-bit token ids). A narrower embedding table is
        refused before the model runs: the data's ids would index past it (an IndexError, on a GPU a device assert)."""
        rows = embedded_tokens(model)
        if rows is not None and rows < self.corpus.vocab_size:
            raise vocabulary_mismatch("embeds", rows, self.corpus.vocab_size)
        longest = positions(model)
        if longest is not None and batch["x"].shape[-1] > longest:
            raise QDistillError(f"windows of {batch['x'].shape[-1]} tokens are longer than the model's {longest} positions (max_position_embeddings): give --seq-len {longest} or less")
        logits = logits_of(model(batch["x"]))
        if logits.shape[-1] != self.corpus.vocab_size:
            raise vocabulary_mismatch("predicts", logits.shape[-1], self.corpus.vocab_size)
        return logits

    def loss(self, out: torch.Tensor, target, batch: dict, cfg) -> torch.Tensor:
        """Cross-entropy on the next token plus T^2 KL(teacher || student) per token, padding out, mean over real tokens."""
        return distillation_loss(out, batch["y"], target, cfg.temperature, cfg.alpha, ignore_index=IGNORE)

    def has_split(self, split: str) -> bool:
        return split in ("train", "val", "test")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Perplexity, mean loss in nats per token, and bits per byte of the split's text.

        Bits per byte does not depend on the tokenizer: the summed loss over the split divided by its
        UTF-8 bytes (the document separators count as tokens, not bytes)."""
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with evaluating(model), parametrize.cached():
            for batch in self.ordered_batches(split, self.eval_batch_size):
                logits = self.forward(model, {"x": batch["x"].to(device)}).float()
                y = batch["y"].to(device)
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="sum").item()
                count += int((y != IGNORE).sum())
        nll = total / count
        metrics = {"ppl": math.exp(min(nll, 700.0)), "nll": nll, "tokens": count}
        size = (self.corpus.split_bytes or {}).get(split)
        if size:
            metrics["bpb"] = total / math.log(2) / size
        return metrics

    def sample(self) -> dict:
        return self.batch("train", [0, min(1, self.train_size() - 1)])

    def teacher(self, model: nn.Module, cfg, cache_dir, progress=None):
        """The live model, or its top-k log-probabilities per token computed once (`cfg.topk`, at `cfg.temperature`)."""
        device = next(model.parameters()).device
        if cfg.teacher_logits == "live" or cache_dir is None:
            return LiveTeacher(model, self.forward)
        return TopKTeacher.build(
            model, self.forward, self.ordered_batches("train", self.eval_batch_size), (self.train_size(), self.seq_len),
            self.corpus.vocab_size, min(cfg.topk, self.corpus.vocab_size), cfg.temperature, self.data_key(), cache_dir, device, progress,
        )


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], new_tokens: int, temperature: float = 0.8, top_k: int | None = 50, seed: int = 0, context: int = 256) -> list[int]:
    """Sample `new_tokens` token ids after `prompt` (at least one id), seeing the last `context` tokens each step
    (no more than the model's positions).

    With temperature 0 the most likely token is taken (greedy). A prompt id the model has no token for (a
    tokenizer that is not the model's) is refused before it indexes past the model's tables."""
    if not prompt:
        raise QDistillError("the prompt must hold at least one token")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt)
    longest = positions(model)
    context = min(context, longest) if longest is not None else context
    with evaluating(model), parametrize.cached():
        vocab = embedded_tokens(model) or logits_of(model(torch.zeros(1, 1, dtype=torch.long, device=device))).shape[-1]  # else what it predicts
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise QDistillError(f"the prompt holds token id {bad[0]!r}, outside the model's vocabulary of {vocab} (ids 0 to {vocab - 1}): "
                                "encode it with the model's own tokenizer (--tokenizer: the tokenizer.json its training ids were made with)")
        for _ in range(new_tokens):
            logits = logits_of(model(torch.tensor([ids[-context:]], device=device)))[0, -1].float()
            if temperature <= 0:
                ids.append(int(logits.argmax()))
                continue
            if top_k:
                logits[logits < logits.topk(min(top_k, len(logits))).values[-1]] = -math.inf
            ids.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)))
    return ids

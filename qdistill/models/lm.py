"""Language-model presets: a tied-embedding LSTM and a small LLaMA-architecture decoder.

Both map input_ids [B, T] to next-token logits [B, T, V] and tie the output layer to the
embedding (Press & Wolf 2017): the largest tensor is stored, quantized and distilled once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from qdistill.errors import QDistillError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

LSTM_PRESETS = {
    # name: (layers, embedding size d, hidden size h, dropout); parameter counts for 8192 tokens
    "lstm-teacher": (2, 512, 512, 0.25),  # ~8.4M
    "lstm-small": (2, 256, 256, 0.1),  # ~3.2M
    "lstm-tiny": (1, 128, 128, 0.0),  # ~1.2M
}

TRANSFORMER_PRESETS = {
    # name: (hidden size, layers, heads, MLP size); parameter counts for 8192 tokens
    "gpt-teacher": (384, 4, 6, 1024),  # ~10.2M
    "gpt-small": (256, 4, 4, 688),  # ~5.3M
    "gpt-tiny": (128, 2, 4, 344),  # ~1.4M
}

MAX_POSITIONS = 512
# sdpa: forward+backward on 2 CPU threads ties with eager from 4x32 to 32x128 tokens (within noise) and is
# 10-20% faster at the full 8x512 context; it never holds the T x T attention weights, and is the GPU fast path.
ATTENTION = "sdpa"


class LSTMLanguageModel(nn.Module):
    """Embedding, LSTM, an optional projection back to the embedding size, and the tied output layer.

    Dropout acts on the embeddings, between LSTM layers and on the LSTM's output (Zaremba et al. 2014):
    only the non-recurrent connections."""

    def __init__(self, vocab_size: int, dim: int = 256, hidden: int = 256, num_layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(dim, hidden, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.proj = nn.Linear(hidden, dim) if hidden != dim else nn.Identity()  # the tied head takes d inputs
        self.head = nn.Linear(dim, vocab_size)
        self.head.weight = self.embedding.weight
        # N(0, 1) embeddings, shared with the head, would make the first logits of size sqrt(d)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x, _ = self.lstm(self.dropout(self.embedding(input_ids)))
        return self.head(self.proj(self.dropout(x)))


def lstm_lm(size: str = "lstm-small", vocab_size: int = 8192) -> LSTMLanguageModel:
    num_layers, dim, hidden, dropout = LSTM_PRESETS[size]
    return LSTMLanguageModel(vocab_size, dim, hidden, num_layers, dropout)


def quiet_optional_backends() -> None:
    """transformers imports torchao where it is installed, which logs a warning per CUDA library it cannot
    load on a CPU build: noise on every command. Silenced unless the user has set these loggers' levels."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


def transformer_lm(size: str = "gpt-small", vocab_size: int = 8192) -> LlamaForCausalLM:
    """A decoder-only LLaMA (RMSNorm, rotary positions, SwiGLU, no biases) with tied embeddings,
    built from a config written here: no download and no Hugging Face cache. `model(input_ids).logits`
    are the logits. LLaMA because its students export to GGUF and Hugging Face LLaMAs load as teachers."""
    quiet_optional_backends()
    try:  # imported here: image models never pay for it
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise QDistillError("the gpt-* presets need Hugging Face transformers: pip install transformers") from None

    hidden, layers, heads, intermediate = TRANSFORMER_PRESETS[size]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,  # token meanings belong to the tokenizer, not to the preset
        eos_token_id=None,
        attn_implementation=ATTENTION,
    )
    return LlamaForCausalLM(config)

"""Per-family quirks of causal LMs, keyed by ``config.model_type`` (never by a model's name).

Only what cannot be read from the tokenizer or config lives here. Anything unlisted gets
``Quirks()``: BOS prepended iff the tokenizer defines one, EOS after supervised text, PAD
falls back to EOS (or UNK) when the tokenizer has none.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Quirks:
    add_bos: bool = True
    """Prepend the tokenizer's BOS token (when it has one)."""
    pad_fallback: str = "eos"
    """Token to use as PAD when the tokenizer has none: eos or unk."""


QUIRKS: dict[str, Quirks] = {
    # Qwen2 tokenizers define no BOS and the models are trained without one.
    "qwen2": Quirks(add_bos=False),
    "qwen3": Quirks(add_bos=False),
    # Phi-1/2 tokenizers (GPT-2 BPE) define <|endoftext|> as BOS, but the model is trained without it.
    "phi": Quirks(add_bos=False),
    # Llama/Vicuna/Mistral: PAD falls back to UNK as LLaVA does (EOS as PAD would be masked anyway).
    "llama": Quirks(pad_fallback="unk"),
    "mistral": Quirks(pad_fallback="unk"),
}


def quirks_for(model_type: str) -> Quirks:
    return QUIRKS.get(model_type, Quirks())

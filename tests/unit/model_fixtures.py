"""Tiny causal LMs of two families (Llama, Qwen2) with a locally built tokenizer, saved with
save_pretrained so tests load them through the real path."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

WORDS = "a red blue green circle square triangle at the top left right bottom center two three and .".split()


def tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainer=trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    kwargs = dict(bos_token="<s>") if with_bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", **kwargs)


def save_llm(family: str, path: Path) -> Path:
    """A random tiny causal LM of ``family`` (llama or qwen2) plus tokenizer, saved at ``path``."""
    torch.manual_seed(0)
    tok = tokenizer(with_bos=family == "llama")
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(family)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

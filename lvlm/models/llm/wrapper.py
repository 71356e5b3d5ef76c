"""One generic causal-LM wrapper for every transformers family.

Owns: loading (local path or hub id, or random weights from the config), adding the image
placeholder token to the tokenizer and resizing the embeddings, the token ids the data side
needs (image, BOS, EOS, PAD) and the decoder layer class. Assumes the model follows
transformers' conventions: ``get_input_embeddings()``, ``inputs_embeds=``, ``hidden_states``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lvlm.config.schema import LLMConfig
from lvlm.models.llm.quirks import Quirks, quirks_for

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LanguageModel(nn.Module):
    """A causal LM plus its tokenizer and the ids the rest of lvlm needs."""

    def __init__(self, model: PreTrainedModel, tokenizer, image_token: str, quirks: Quirks) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.quirks = quirks
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(image_token)
        self.bos_token_id: int | None = tokenizer.bos_token_id if quirks.add_bos else None
        self.eos_token_id: int | None = tokenizer.eos_token_id
        if tokenizer.pad_token_id is None:
            fallback = tokenizer.eos_token if quirks.pad_fallback == "eos" else tokenizer.unk_token
            tokenizer.pad_token = fallback or tokenizer.eos_token
        self.pad_token_id: int = tokenizer.pad_token_id

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def layer_cls(self) -> type[nn.Module]:
        """The decoder block class (activation checkpointing, ZeRO-3 leaf modules)."""
        return type(self.decoder_layers()[0])

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder blocks: the longest ModuleList of the model (family-independent)."""
        lists = [m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        return max(lists, key=len)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, D]
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False):
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=output_hidden_states, use_cache=False, return_dict=True)


def build_llm(cfg: LLMConfig) -> LanguageModel:
    """Load (or randomly initialise) the LLM and its tokenizer; add the image placeholder token."""
    dtype = _DTYPES[cfg.dtype]
    common = dict(trust_remote_code=cfg.trust_remote_code)
    try:
        hf_config = AutoConfig.from_pretrained(cfg.name_or_path, **common)
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.name_or_path, **common)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not load LLM config/tokenizer from {cfg.name_or_path!r} (model.llm.name_or_path): {e}") from e
    hf_config._attn_implementation = cfg.attn_implementation
    if cfg.random_init:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=hf_config, dtype=dtype, **common)
    if cfg.image_token in tokenizer.get_vocab():
        added = {t.content for t in tokenizer.added_tokens_decoder.values()}
        if cfg.image_token not in added:  # text encoding strips the image id: the word would vanish from all text
            raise ValueError(f"model.llm.image_token {cfg.image_token!r} is an ordinary token of the LLM's "
                             f"vocabulary (id {tokenizer.convert_tokens_to_ids(cfg.image_token)}): every occurrence "
                             "in training text would be taken for an image; choose a string the vocabulary does not "
                             "hold (default <image>) or one of its added tokens")
    else:
        tokenizer.add_special_tokens({"additional_special_tokens": [cfg.image_token]},
                                     replace_extra_special_tokens=False)
    vocab = len(tokenizer)
    if vocab > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return LanguageModel(model, tokenizer, cfg.image_token, quirks_for(hf_config.model_type))

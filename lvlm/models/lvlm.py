"""Composition: vision encoder -> connector -> spliced into the LLM's input embeddings -> LLM.

The data side expands each image into ``tokens_per_image`` copies of the image placeholder
token, so sequence lengths are known before the model runs and an image span is never cut.
Here those placeholder embeddings are replaced, in order, by the connector outputs.
The loss is returned as a *sum* over supervised tokens plus the token count, so the training
loop can weight by tokens across gradient accumulation and ranks.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from lvlm.models.connectors import Connector
from lvlm.models.llm import LanguageModel
from lvlm.models.moca import MoCa
from lvlm.models.vision.base import VisionEncoder

IGNORE_INDEX = -100


@dataclass
class LVLMOutput(ModelOutput):
    """A dict-like output (transformers ModelOutput), so DeepSpeed's ZeRO-3 hooks see its tensors."""

    loss_sum: torch.Tensor | None = None
    """Sum of token cross-entropies over supervised positions (scalar, float32)."""
    num_tokens: torch.Tensor | None = None
    """Number of supervised positions (scalar, long)."""
    logits: torch.Tensor | None = None
    """[B, L, vocab] when requested."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """LLM hidden states, index 0 = input embeddings, [B, L, D] each, when requested."""
    modality_mask: torch.Tensor | None = None
    """[B, L] long: 1 at image-token positions, 0 at text, -1 at padding; when hidden states are requested."""

    @property
    def loss(self) -> torch.Tensor:
        """Mean loss over this batch's supervised tokens."""
        return self.loss_sum / self.num_tokens.clamp(min=1)


class LVLM(nn.Module):
    def __init__(self, vision: VisionEncoder, connector: Connector, llm: LanguageModel,
                 moca: MoCa | None = None) -> None:
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.moca = moca
        if moca is not None:
            moca.attach(llm.decoder_layers())

    @property
    def tokens_per_image(self) -> int:
        return self.connector.num_tokens(self.vision.num_tokens())

    @property
    def image_token_id(self) -> int:
        return self.llm.image_token_id

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, tokens_per_image, llm_dim]."""
        feats = self.vision(pixel_values.to(self._vision_dtype()))  # [N, n_vis, vision_dim]
        return self.connector(feats.to(self._connector_dtype()))

    def _vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def _connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image placeholders replaced by image features: [B, L, D]."""
        is_image = input_ids == self.image_token_id  # [B, L]
        embeds = self.llm.embed(input_ids)
        has_images = pixel_values is not None and pixel_values.shape[0] > 0
        if not has_images:
            if bool(is_image.any()):
                raise ValueError("batch has image placeholder tokens but no pixel_values")
            # Run the vision path anyway on one blank image and add it with weight 0, so every rank
            # executes the same modules each step (ZeRO-3 gathers parameters collectively).
            size = self.vision.image_size
            dummy = torch.zeros(1, 3, size, size, device=embeds.device)
            return embeds + 0.0 * self.encode_images(dummy).sum().to(embeds.dtype)
        feats = self.encode_images(pixel_values)  # [N, T, D]
        n_slots, n_feats = int(is_image.sum()), feats.shape[0] * feats.shape[1]
        if n_slots != n_feats:
            raise ValueError(f"batch has {n_slots} image placeholder tokens but {feats.shape[0]} images x "
                             f"{feats.shape[1]} tokens = {n_feats} image features")
        mask = is_image.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, feats.to(embeds.dtype).reshape(-1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                return_logits: bool = False) -> LVLMOutput:
        embeds = self.embed(input_ids, pixel_values)  # [B, L, D]
        calibrate = self.moca.image_positions(input_ids == self.image_token_id) if self.moca else nullcontext()
        with calibrate:
            out = self.llm(embeds, attention_mask=attention_mask, position_ids=position_ids,
                           output_hidden_states=output_hidden_states)
        logits = out.logits  # [B, L, V]
        if labels is None:
            loss_sum = logits.new_zeros((), dtype=torch.float32)
            n_tok = torch.zeros((), dtype=torch.long, device=logits.device)
        else:
            shift_labels = labels[:, 1:]  # predict token t+1 from position t
            loss_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            n_tok = (shift_labels != IGNORE_INDEX).sum()
        result = LVLMOutput(loss_sum=loss_sum, num_tokens=n_tok, logits=logits if return_logits else None)
        if output_hidden_states:
            result.hidden_states = out.hidden_states
            mask = (input_ids == self.image_token_id).long()
            if attention_mask is not None:
                mask = mask.masked_fill(attention_mask == 0, -1)
            result.modality_mask = mask
        return result

"""Composition: vision encoder -> connector -> spliced into the LLM's input embeddings -> LLM.

The data side expands each image into ``tokens_per_image`` copies of the image placeholder
token, so sequence lengths are known before the model runs and an image span is never cut.
Here those placeholder embeddings are replaced, in order, by the connector outputs.
The loss is returned as a *sum* over supervised tokens plus the token count, so the training
loop can weight by tokens across gradient accumulation and ranks.

Packed rows (``lvlm.data.packing``): ``forward(..., sequence_ids=[B, L])`` confines attention to
each packed sample (causal inside it, nothing across samples) and ignores any label predicted
across a sample boundary. How attention is confined depends on the LLM's attention kernel:
"sdpa" gets a 4D bool mask [B, 1, L, L] (True = attend) and "eager" the same as an additive float
mask (0 / dtype min); transformers (5.x ``masking_utils``) passes an already 4D mask through
untouched. Flash-attention kernels get no mask: the rows are flattened to one [1, B*L] sequence
and transformers' varlen path splits it where ``position_ids`` restart at 0 (it only does so for
batch size 1, hence the flattening), so every packed sample must start at position 0.
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


def _run_starts(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: True where a run of equal sequence ids begins (always at column 0)."""
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    return starts


def segment_positions(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L] long: the position of each token within its run of equal sequence ids (0, 1, ...)."""
    idx = torch.arange(sequence_ids.shape[1], device=sequence_ids.device).expand_as(sequence_ids)
    start_idx = torch.where(_run_starts(sequence_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] -> bool [B, 1, L, L], True where query q may attend key k: same run of sequence ids and k <= q.

    Runs are contiguous stretches of equal ids, so the padding run (id -1) only sees itself and no
    query row is ever fully masked (which would give NaN in SDPA).
    """
    runs = _run_starts(sequence_ids).long().cumsum(dim=1)  # [B, L]
    length = sequence_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    return ((runs[:, :, None] == runs[:, None, :]) & causal)[:, None]


def _uses_position_ids_packing(attn_implementation: str) -> bool:
    """Flash-attention kernels find packed samples from position_ids; others need a 4D mask."""
    return "flash" in attn_implementation


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

    def _packed_llm_inputs(self, sequence_ids: torch.Tensor, position_ids: torch.Tensor | None,
                           dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor, bool]:
        """(attention mask for the LLM, position_ids, flatten rows?) for packed rows."""
        if position_ids is None:
            position_ids = segment_positions(sequence_ids)
        if position_ids.shape != sequence_ids.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} and sequence_ids "
                             f"{tuple(sequence_ids.shape)} must both be [B, L]")
        impl = self.llm.model.config._attn_implementation or "eager"
        if _uses_position_ids_packing(impl):
            starts = _run_starts(sequence_ids) & (sequence_ids >= 0)
            if bool((position_ids[starts] != 0).any()):
                raise ValueError(f"attn_implementation {impl!r} finds packed samples where position_ids restart "
                                 "at 0, but some packed sample does not start at position 0")
            return None, position_ids, True
        mask = block_causal_mask(sequence_ids)
        if impl == "sdpa":
            return mask, position_ids, False
        if impl == "eager":
            zero = torch.zeros((), dtype=dtype, device=mask.device)
            return torch.where(mask, zero, torch.finfo(dtype).min), position_ids, False
        raise ValueError(f"packed sequences (sequence_ids) are not supported with attn_implementation {impl!r}; "
                         "use eager, sdpa or flash_attention_2")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                return_logits: bool = False, sequence_ids: torch.Tensor | None = None) -> LVLMOutput:
        """``sequence_ids`` [B, L] (packed rows: sample index within the row, -1 on padding) confines attention
        to each sample; ``position_ids`` then default to positions restarting at 0 per sample."""
        embeds = self.embed(input_ids, pixel_values)  # [B, L, D]
        is_image = input_ids == self.image_token_id
        batch, length = input_ids.shape
        llm_mask, flatten = attention_mask, False
        if sequence_ids is not None:
            if sequence_ids.shape != input_ids.shape:
                raise ValueError(f"sequence_ids {tuple(sequence_ids.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}")
            llm_mask, position_ids, flatten = self._packed_llm_inputs(sequence_ids, position_ids, embeds.dtype)
        if flatten:  # one [1, B*L] sequence: transformers' flash varlen detection needs batch size 1
            embeds, position_ids, is_image = (embeds.reshape(1, batch * length, -1), position_ids.reshape(1, -1),
                                              is_image.reshape(1, -1))
        calibrate = self.moca.image_positions(is_image) if self.moca else nullcontext()
        with calibrate:
            out = self.llm(embeds, attention_mask=llm_mask, position_ids=position_ids,
                           output_hidden_states=output_hidden_states)
        logits = out.logits.reshape(batch, length, -1)  # [B, L, V]
        if labels is None:
            loss_sum = logits.new_zeros((), dtype=torch.float32)
            n_tok = torch.zeros((), dtype=torch.long, device=logits.device)
        else:
            shift_labels = labels[:, 1:]  # predict token t+1 from position t
            if sequence_ids is not None:  # never predict a sample's first token from the previous sample
                shift_labels = shift_labels.masked_fill(sequence_ids[:, 1:] != sequence_ids[:, :-1], IGNORE_INDEX)
            loss_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            n_tok = (shift_labels != IGNORE_INDEX).sum()
        result = LVLMOutput(loss_sum=loss_sum, num_tokens=n_tok, logits=logits if return_logits else None)
        if output_hidden_states:
            result.hidden_states = (tuple(h.reshape(batch, length, -1) for h in out.hidden_states) if flatten
                                    else out.hidden_states)
            mask = (input_ids == self.image_token_id).long()
            if attention_mask is not None:
                mask = mask.masked_fill(attention_mask == 0, -1)
            if sequence_ids is not None:
                mask = mask.masked_fill(sequence_ids < 0, -1)
            result.modality_mask = mask
        return result

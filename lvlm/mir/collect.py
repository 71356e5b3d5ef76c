"""Running a model on the probe and feeding MIR one layer group at a time.

Owns: the forward passes (no grad, every hidden state of one batch at a time), pooling the vision
and text rows of the requested layers over all probe samples, and streaming layers: at most
``layers_per_pass`` layers' pooled rows are held at once, then handed to ``LayerwiseMIR`` and freed,
so peak memory grows with one group of layers' tokens, not with all layers. Under ZeRO-3 every rank
must call this (parameters are gathered collectively); only ``compute`` ranks keep rows.
"""
from __future__ import annotations

import torch

from lvlm.mir import LayerwiseMIR, MIRResult

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values")


@torch.no_grad()
def probe_mir(forward, probe, num_layers: int, device: torch.device, cross: str = "exact",
              layers_per_pass: int | None = None, compute: bool = True) -> MIRResult | None:
    """MIR over LLM layers 1..num_layers (hidden-state index 0, the embeddings, is skipped).

    ``forward(**batch)`` must return an LVLMOutput with hidden_states. ``layers_per_pass`` = None
    holds every layer's pooled rows in one pass (fastest); smaller values run the probe
    ceil(K / layers_per_pass) times and bound memory.
    """
    layers = list(range(1, num_layers + 1))
    group = layers_per_pass or len(layers)
    acc = LayerwiseMIR(cross=cross) if compute else None
    for start in range(0, len(layers), group):
        chunk = layers[start:start + group]
        vision: dict[int, list[torch.Tensor]] = {k: [] for k in chunk}
        text: dict[int, list[torch.Tensor]] = {k: [] for k in chunk}
        for batch in probe.batches:
            out = forward(**{k: batch[k].to(device) for k in MODEL_KEYS}, output_hidden_states=True)
            vmask, tmask = batch["vision_mask"].to(device), batch["text_mask"].to(device)
            if compute:
                for k in chunk:
                    h = out.hidden_states[k]  # [B, L, D]
                    vision[k].append(h[vmask].float())
                    text[k].append(h[tmask].float())
            del out
        if compute:
            for k in chunk:
                acc.add_layer(torch.cat(vision.pop(k)), torch.cat(text.pop(k)))
    return acc.result() if compute else None

"""Running a model on the probe and feeding MIR one group of layers at a time, on one or many ranks.

Owns: the forward passes (no grad, every hidden state of one batch at a time), pooling the vision
and text rows of the requested layers over all probe samples, and bounding memory:

* Rows are kept in the model's own dtype (bf16 rows stay bf16; the distance converts one layer
  to float64, which is lossless), on the device the model runs on.
* Layers are streamed in groups: a pass over the probe keeps the pooled rows of ``group`` layers,
  hands them to ``LayerwiseMIR`` one layer at a time and frees them before the next pass. The
  group size is ``layers_per_pass`` when set, otherwise the most layers whose rows fit in
  ``memory_gb`` (known exactly from the probe's masks and the first forward's hidden size), at
  least one. So peak memory grows with one layer's tokens, and with no more passes than needed.
* Several ranks split the probe: batch ``b`` runs on rank ``b % world_size``; each rank keeps the
  rows of its own batches and ``gather`` merges them onto rank 0, layer by layer, which computes
  the distance (row order never changes MIR). Ranks with fewer batches repeat a forward and drop
  its rows, so under ZeRO-3 every rank makes the same collective calls.

Knows nothing of torch.distributed: the caller (lvlm.train) passes ``gather``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from lvlm.mir import LayerwiseMIR, MIRResult

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values")
Gather = Callable[[torch.Tensor], Optional[list[torch.Tensor]]]
"""Rank-local rows [n, d] -> every rank's rows on rank 0 (a list, one entry per rank), None elsewhere."""


def rows_per_layer(probe) -> int:
    """Vision + text rows one layer contributes over the whole probe set."""
    return sum(int(b["vision_mask"].sum()) + int(b["text_mask"].sum()) for b in probe.batches)


def plan_group(num_layers: int, layer_bytes: int, layers_per_pass: int, memory_gb: float) -> int:
    """How many layers one pass keeps: ``layers_per_pass`` if > 0, else as many as fit in ``memory_gb``."""
    if layers_per_pass < 0 or memory_gb <= 0:
        raise ValueError(f"mir.layers_per_pass must be >= 0 (0 = auto) and mir.memory_gb > 0; got "
                         f"{layers_per_pass} and {memory_gb}")
    if layers_per_pass:
        return min(layers_per_pass, num_layers)
    return max(1, min(num_layers, int(memory_gb * 2**30 // max(layer_bytes, 1))))


@torch.no_grad()
def probe_mir(forward, probe, num_layers: int, device: torch.device, cross: str = "exact",
              layers_per_pass: int = 0, memory_gb: float = 8.0, rank: int = 0, world_size: int = 1,
              gather: Gather | None = None) -> MIRResult | None:
    """MIR over LLM layers 1..num_layers (hidden-state index 0, the embeddings, is skipped).

    ``forward(**batch)`` must return an LVLMOutput with hidden_states. Returns the result on rank 0,
    None on other ranks. With ``world_size`` > 1, ``gather`` is required.
    """
    if world_size > 1 and gather is None:
        raise ValueError("probe_mir on several ranks needs a gather function (rows -> rank 0)")
    mine = list(range(rank, len(probe.batches), world_size))
    turns = math.ceil(len(probe.batches) / world_size)  # forwards per rank per pass, equal on all ranks
    acc = LayerwiseMIR(cross=cross) if rank == 0 else None
    group, start, empty = None, 1, None
    while start <= num_layers:
        chunk: list[int] = []
        vision: dict[int, list[torch.Tensor]] = {}
        text: dict[int, list[torch.Tensor]] = {}
        for turn in range(turns):
            keep = turn < len(mine)
            batch = probe.batches[mine[turn] if keep else (mine or [0])[-1]]
            out = forward(**{k: batch[k].to(device) for k in MODEL_KEYS}, output_hidden_states=True)
            if group is None:  # sized once, from the first forward's hidden size and dtype
                h1 = out.hidden_states[1]
                empty = h1.new_empty(0, h1.shape[-1])  # the rows of a rank that has no batch
                group = plan_group(num_layers, rows_per_layer(probe) * h1.shape[-1] * h1.element_size(),
                                   layers_per_pass, memory_gb)
            if not chunk:
                chunk = list(range(start, min(start + group, num_layers + 1)))
                vision, text = {k: [] for k in chunk}, {k: [] for k in chunk}
            if keep:
                vmask, tmask = batch["vision_mask"].to(device), batch["text_mask"].to(device)
                for k in chunk:
                    h = out.hidden_states[k]  # [B, L, D]
                    vision[k].append(h[vmask])
                    text[k].append(h[tmask])
            del out
        for k in chunk:
            v = _merge(vision.pop(k) or [empty], world_size, gather)
            t = _merge(text.pop(k) or [empty], world_size, gather)
            if acc is not None:
                acc.add_layer(v, t)
        start += len(chunk)
    return acc.result() if acc is not None else None


def _merge(parts: list[torch.Tensor], world_size: int, gather: Gather | None) -> torch.Tensor | None:
    """This rank's rows of one layer, merged over ranks onto rank 0 ([n_total, d]; None elsewhere)."""
    local = torch.cat(parts)
    if world_size == 1:
        return local
    assert gather is not None
    gathered = gather(local)
    return torch.cat([g.to(local.device) for g in gathered]) if gathered is not None else None

"""MoCa (modality calibration, Huang et al. 2024): a learnable per-layer scale and shift on image tokens.

Owns: one ``scale`` (init 1) and ``shift`` (init 0) vector of size hidden_size per decoder layer,
applied at the end of each decoder layer to image-token positions only, in float32:
``h = (1 - m) * h + m * (scale * h + shift)``, m = 1 on image tokens. Inserted with forward hooks on
the decoder layers (prepended, so transformers' own hidden-state capture sees the calibrated
output); no transformers code is edited or patched. Each layer's calibration is a submodule that
the hook *calls*, so DeepSpeed ZeRO-3 gathers its parameters like any other module's. The image
mask of the current forward pass is set by ``LVLM.forward`` (``image_positions``) and cleared after.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class LayerCalibration(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden_size))  # [D]
        self.shift = nn.Parameter(torch.zeros(hidden_size))  # [D]

    def forward(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # [B, L, D], [B, L, 1]
        x = h.float()
        return ((1 - m) * x + m * (self.scale.float() * x + self.shift.float())).to(h.dtype)


class MoCa(nn.Module):
    def __init__(self, num_layers: int, hidden_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LayerCalibration(hidden_size) for _ in range(num_layers))
        self._mask: torch.Tensor | None = None  # [B, L, 1] float32, only during a forward pass

    def attach(self, decoder_layers: nn.ModuleList) -> None:
        if len(decoder_layers) != len(self.layers):
            raise ValueError(f"MoCa has {len(self.layers)} layers but the LLM has {len(decoder_layers)}")
        for i, layer in enumerate(decoder_layers):
            layer.register_forward_hook(self._hook(i), prepend=True)

    def _hook(self, index: int):
        def calibrate(module, args, output):
            if self._mask is None:
                return output
            h = output[0] if isinstance(output, tuple) else output  # [B, L, D]
            new = self.layers[index](h, self._mask.to(h.device))
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return calibrate

    @contextmanager
    def image_positions(self, is_image: torch.Tensor):
        """Calibrate the positions where ``is_image`` [B, L] is true during the enclosed forward pass."""
        self._mask = is_image.unsqueeze(-1).float()
        try:
            yield
        finally:
            self._mask = None

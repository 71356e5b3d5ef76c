"""The one sample type for every data kind.

A caption pair is [image, text]; an interleaved document is [text, image, text, ...]; a
text-only document is [text]. Roles mark which text is supervised: ``assistant`` text gets
labels, ``user``/``system`` text is context only. Images are kept as encoded bytes until a
worker decodes them, so skipping samples (resume, rank splits) costs no decode.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Union

from PIL import Image


@dataclass
class TextSegment:
    text: str
    role: str = "assistant"
    """assistant (supervised), user or system (context only)."""
    ends_turn: bool = False
    """The text already ends with its turn's end-of-turn marker (a chat template's ``</s>``,
    ``<|im_end|>`` ...), so the tokenizer adds no EOS after it."""

    @property
    def supervised(self) -> bool:
        return self.role == "assistant"


@dataclass
class ImageSegment:
    data: Union[bytes, Image.Image]
    """Encoded image bytes (decoded lazily) or an already-decoded PIL image."""

    def load(self) -> Image.Image:
        """Decode to RGB; raises on corrupt data (callers skip and count)."""
        if isinstance(self.data, Image.Image):
            return self.data.convert("RGB")
        with Image.open(io.BytesIO(self.data)) as im:
            return im.convert("RGB")


Segment = Union[TextSegment, ImageSegment]


@dataclass
class Sample:
    segments: list[Segment]
    key: str = ""
    """Identifier within its source (shard member key, JSON id)."""
    source: str = ""
    """Name of the source it came from."""
    meta: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return sum(isinstance(s, ImageSegment) for s in self.segments)

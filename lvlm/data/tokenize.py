"""Sample -> token ids and labels, with image placeholders and never-split image spans.

Owns the sequence layout and the truncation rule. Given a tokenizer (anything callable as
``tokenizer(text, add_special_tokens=False)["input_ids"]``), the id of the image placeholder
token and how many LLM tokens one image becomes, a ``Sample`` becomes::

    [bos?] then per segment:
        image      -> tokens_per_image x image_token_id            labels -100
        user text  -> tokenizer ids                                  labels -100
        assistant  -> tokenizer ids, then eos (if eos_token_id set)  labels = ids
                      when the assistant turn ends there (next text is user/system, or the end):
                      one EOS per chat turn, one per interleaved document

A conversation (a sample with a ``user`` turn) is first laid out by ``lvlm.data.chat.render_chat``: the
tokenizer's chat template (LLaVA v1 without one), labels on assistant content and its end-of-turn text.

Labels are aligned with ``input_ids`` (no shift; the model shifts, as transformers does).
Truncation to ``max_length`` cuts text only: if an image span would cross ``max_length``, that
image and everything after it are dropped. A sample that had images but keeps none is dropped
(``image_exceeds_max_length``); a sample left without any supervised label is dropped
(``no_supervised_tokens``). Placeholder ids produced by tokenizing text (a literal ``<image>`` in
a caption) are removed, so the number of image spans always equals the number of images.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from lvlm.data.chat import ChatFormatError, is_chat, render_chat
from lvlm.data.sample import ImageSegment, Sample, Segment, TextSegment
from lvlm.data.skips import SkipCounter

log = logging.getLogger("lvlm.data")

IGNORE_INDEX = -100


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    images: list[ImageSegment]
    """Images whose spans are in ``input_ids``, in order (still encoded)."""
    key: str = ""
    source: str = ""


def _check_int(name: str, value: Any, minimum: Optional[int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _turn_ends(segments: list) -> list[bool]:
    """Per segment: does an assistant turn end after it? True for an assistant text followed (images
    skipped) by a user/system text or by the end of the sample: a chat gets EOS after every assistant
    turn, an interleaved document [text, image, text, ...] one EOS at its end."""
    ends, following = [False] * len(segments), None
    for i in range(len(segments) - 1, -1, -1):
        seg = segments[i]
        if isinstance(seg, TextSegment):
            ends[i] = seg.supervised and (following is None or not following.supervised)
            following = seg
    return ends


class SampleTokenizer:
    """Callable turning a ``Sample`` into a ``TokenizedSample`` (or None when it must be dropped)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_token_id: int,
        tokens_per_image: int,
        max_length: int,
        bos_token_id: Optional[int],
        eos_token_id: Optional[int],
        system_prompt: str = "",
    ) -> None:
        _check_int("image_token_id", image_token_id, 0)
        _check_int("tokens_per_image", tokens_per_image, 1)
        _check_int("max_length", max_length, 1)
        for name, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if value is not None:
                _check_int(name, value, 0)
        if image_token_id in (bos_token_id, eos_token_id):
            raise ValueError(f"image_token_id {image_token_id} must differ from bos/eos token ids")
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.system_prompt = system_prompt
        self._warned_format = False  # the first conversation the chat template refuses is logged, later ones counted

    def encode_text(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids if i != self.image_token_id]

    def __call__(self, sample: Sample, skips: Optional[SkipCounter] = None) -> Optional[TokenizedSample]:
        segments = sample.segments
        if is_chat(segments):
            try:
                segments = render_chat(segments, self.tokenizer, self.system_prompt)
            except ChatFormatError as e:  # this record only (e.g. a ShareGPT conversation opening with gpt)
                if not self._warned_format:
                    log.warning("sample %r skipped (bad_conversation; later ones are only counted): %s",
                                sample.key, e)
                    self._warned_format = True
                if skips is not None:
                    skips.add("bad_conversation")
                return None
        try:
            ids, labels, images = self._layout(segments)
        except TypeError as e:
            raise TypeError(f"sample {sample.key!r}: {e}") from None
        reason = None
        if sample.num_images > 0 and not images:
            reason = "image_exceeds_max_length"
        elif all(label == IGNORE_INDEX for label in labels):
            reason = "no_supervised_tokens"
        if reason is not None:
            if skips is not None:
                skips.add(reason)
            return None
        return TokenizedSample(input_ids=ids, labels=labels, images=images, key=sample.key, source=sample.source)

    def prompt(self, segments: list[Segment]) -> tuple[list[int], list[ImageSegment]]:
        """(ids, images) of a generation prompt: chat turns rendered with the template's generation prompt
        (the assistant's answer left to generate), laid out exactly as a training sample is (BOS,
        ``tokens_per_image`` placeholders per image, text by ``encode_text``), so an evaluator asks what
        SFT trained on."""
        if is_chat(segments):
            segments = render_chat(segments, self.tokenizer, self.system_prompt, add_generation_prompt=True)
        ids, _, images = self._layout(segments)
        return ids, images

    def _layout(self, segments: list[Segment]) -> tuple[list[int], list[int], list[ImageSegment]]:
        """ids, labels and images of already formatted segments, cut at ``max_length`` (an image span is
        never split: it and everything after it is dropped)."""
        ids: list[int] = []
        labels: list[int] = []
        images: list[ImageSegment] = []
        if self.bos_token_id is not None:
            ids.append(self.bos_token_id)
            labels.append(IGNORE_INDEX)
        ends_turn = _turn_ends(segments)
        for segment, end in zip(segments, ends_turn):
            room = self.max_length - len(ids)
            if room <= 0:
                break
            if isinstance(segment, ImageSegment):
                if self.tokens_per_image > room:
                    break
                ids.extend([self.image_token_id] * self.tokens_per_image)
                labels.extend([IGNORE_INDEX] * self.tokens_per_image)
                images.append(segment)
            elif isinstance(segment, TextSegment):
                text_ids = self.encode_text(segment.text)
                if segment.supervised:
                    if self.eos_token_id is not None and end and not segment.ends_turn:
                        text_ids.append(self.eos_token_id)
                    text_labels = list(text_ids)
                else:
                    text_labels = [IGNORE_INDEX] * len(text_ids)
                ids.extend(text_ids[:room])
                labels.extend(text_labels[:room])
                if len(text_ids) > room:
                    break
            else:
                raise TypeError(f"unsupported segment type {type(segment).__name__}")
        return ids, labels, images

"""Scenes of the synthetic world and their captions (no pixels here).

Owns: the world's closed vocabulary (shapes, colours, counts, 3x3 grid positions, caption
templates, and the question words of ``lvlm.toy.vqa``), sampling a scene from a numpy ``Generator``
and writing its caption. A scene is 1-3 groups; each group is 1-3 objects of one shape and one
colour in one grid cell; groups have distinct colours and distinct cells and are listed in reading
order (top left first).

Assumes: every random choice goes through the given Generator, in a fixed order, so the same
generator state always yields the same scene and caption. Captions are lowercase words and
punctuation only, so the word-level toy tokenizer (``lvlm.toy.tokenizer``) covers them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 30, 30)),
    ("green", (30, 170, 50)),
    ("blue", (30, 70, 220)),
    ("yellow", (240, 210, 20)),
    ("purple", (140, 40, 180)),
    ("orange", (250, 130, 10)),
)
COLOUR_NAMES: tuple[str, ...] = tuple(name for name, _ in COLOURS)
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
"""Canonical names of the 3x3 grid cells, index = 3 * row + col."""
POSITION_PHRASES: tuple[tuple[str, ...], ...] = (
    ("at the top left", "in the top left corner"),
    ("at the top", "at the top center"),
    ("at the top right", "in the top right corner"),
    ("on the left", "at the left"),
    ("in the center", "in the middle"),
    ("on the right", "at the right"),
    ("at the bottom left", "in the bottom left corner"),
    ("at the bottom", "at the bottom center"),
    ("at the bottom right", "in the bottom right corner"),
)
"""Caption phrases per grid cell (same order as POSITIONS)."""
TEMPLATES: tuple[str, ...] = (
    "{list}.",
    "there {be} {list}.",
    "the image shows {list}.",
    "a picture of {list}.",
    "in this image there {be} {list}.",
)
GROUP_WEIGHTS: tuple[float, ...] = (0.3, 0.4, 0.3)
"""Probability of a scene having 1, 2 or 3 groups."""
EXTRA_WORDS: tuple[str, ...] = (
    "describe", "briefly", "what", "is", "in", "this", "the", "image", "picture", "user",
    "assistant", "?", ":", "an", "a", "and", "are", "there", ",", ".",
)
"""Words outside captions kept in the vocabulary (simple prompts, articles, punctuation)."""

_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def split_words(text: str) -> list[str]:
    """Lowercase words and punctuation runs, the toy tokenizer's pre-tokenisation."""
    return _WORD_RE.findall(text.lower())


@dataclass(frozen=True)
class Group:
    """``count`` objects of one ``shape`` and ``colour`` in grid ``cell`` (0..8, reading order)."""

    shape: str
    colour: str
    count: int
    cell: int

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def as_dict(self) -> dict:
        return {"shape": self.shape, "color": self.colour, "count": self.count,
                "position": self.position, "row": self.row, "col": self.col}


@dataclass(frozen=True)
class Scene:
    """The groups of one image, in reading order."""

    groups: tuple[Group, ...]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw 1-3 groups with distinct colours and cells."""
    n = int(rng.choice(len(GROUP_WEIGHTS), p=GROUP_WEIGHTS)) + 1
    cells = rng.choice(9, size=n, replace=False)
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    shapes = rng.integers(0, len(SHAPES), size=n)
    counts = rng.integers(1, 4, size=n)
    groups = [Group(SHAPES[int(s)], COLOUR_NAMES[int(c)], int(k), int(cell))
              for cell, c, s, k in zip(cells, colours, shapes, counts)]
    return Scene(tuple(sorted(groups, key=lambda g: g.cell)))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def group_phrase(group: Group, rng: np.random.Generator) -> str:
    """'two red circles at the top left', 'an orange square in the middle', ..."""
    noun = group.shape if group.count == 1 else group.shape + "s"
    if group.count == 1:
        count = "one" if rng.random() < 0.25 else _article(group.colour)
    else:
        count = COUNT_WORDS[group.count - 1]
    phrases = POSITION_PHRASES[group.cell]
    where = phrases[int(rng.integers(0, len(phrases)))]
    return f"{count} {group.colour} {noun} {where}"


def caption(scene: Scene, rng: np.random.Generator) -> tuple[str, int]:
    """The caption of ``scene`` and the index of the template used."""
    parts = [group_phrase(g, rng) for g in scene.groups]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    template = int(rng.integers(0, len(TEMPLATES)))
    be = "is" if scene.groups[0].count == 1 else "are"
    return TEMPLATES[template].format(list=listed, be=be), template


def vocabulary() -> list[str]:
    """Every word and punctuation token a caption, a simple prompt or a question (``lvlm.toy.vqa``) can
    contain, sorted."""
    words: set[str] = set(EXTRA_WORDS)
    words.update(SHAPES)
    words.update(s + "s" for s in SHAPES)
    words.update(COLOUR_NAMES)
    words.update(COUNT_WORDS)
    for phrases in POSITION_PHRASES:
        for phrase in phrases:
            words.update(split_words(phrase))
    for template in TEMPLATES:
        words.update(split_words(template.replace("{list}", " ").replace("{be}", " ")))
    from lvlm.toy.vqa import TEMPLATE_WORDS  # the question templates (that module imports this one)

    words.update(TEMPLATE_WORDS)
    return sorted(words)

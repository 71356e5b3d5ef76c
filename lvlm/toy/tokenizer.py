"""The toy word-level tokenizer, built locally from the world's closed vocabulary.

Owns: a ``tokenizers`` WordLevel model (lowercasing normaliser; words and punctuation runs
as separate tokens; specials ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3; a leading
``<s>`` added like LLaMA tokenizers) wrapped in ``transformers.PreTrainedTokenizerFast``.
Decoding joins words with spaces and removes the space before punctuation, so lowercase
captions round-trip exactly.

Chat template (``CHAT_TEMPLATE``, vocabulary words only): a user message renders as
``user : {content} ``, an assistant message as ``assistant : {content}</s> `` (EOS closes every
assistant turn), a system message as ``{content} ``; the generation prompt is ``assistant :``. The
template adds no ``<s>``: the data side prepends BOS. So a question about an image reads
``<s> user : <image> what colour is the circle? assistant : red </s>``.

Assumes: captions only use words of ``lvlm.toy.scene.vocabulary()``; anything else maps to
``<unk>``. The ids of the specials match open_clip's text-tower defaults (pad 0, eos 2).
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lvlm.toy.scene import vocabulary

SPECIALS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIALS))
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}user : {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}assistant : {{ m['content'] }}</s> "
    "{% elif m['role'] == 'system' %}{{ m['content'] }} "
    "{% else %}{{ raise_exception('toy chat roles are user, assistant and system, got ' + m['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_tokenizer(words: list[str] | None = None, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A fast tokenizer over ``SPECIALS + words`` (default: the world's vocabulary)."""
    words = vocabulary() if words is None else words
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    # WordPiece's decoder joins tokens with spaces and (cleanup) drops the space before punctuation;
    # no toy word starts with its continuation prefix, so that is all it does here.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=model_max_length, padding_side="right", clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )

"""Chat formatting: conversations rendered exactly as the tokenizer's chat template renders them, with labels
on assistant content plus its end-of-turn text only, and LLaVA v1 without a template."""
from __future__ import annotations

import pytest

from lvlm.data.chat import LLAVA_SYSTEM, ChatFormatError, is_chat, render_chat
from lvlm.data.sample import ImageSegment, Sample, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.tokenize import IGNORE_INDEX, SampleTokenizer

from data_fixtures import build_tokenizer, jpeg_bytes

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama-2 style: refuses a system message, BOS in the template, EOS after each answer
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('system role not supported') }}"
          "{% elif m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
          "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
WORDS = "what colour is the circle red and square blue a picture of shapes describe it".split()


def tokenizer(template=None):
    tok = build_tokenizer([" ".join(WORDS)])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]})
    if template:
        tok.chat_template = template
    return tok


def conversation():
    return [ImageSegment(jpeg_bytes(0)), TextSegment("what colour is the circle", role="user"),
            TextSegment("red", role="assistant"), TextSegment("and the square", role="user"),
            TextSegment("blue", role="assistant")]


def flat(segments):
    return "".join("<image>" if isinstance(s, ImageSegment) else s.text for s in segments)


def supervised(segments):
    return [s.text for s in segments if isinstance(s, TextSegment) and s.supervised]


def test_chatml_matches_template_and_labels_answers_with_end_of_turn():
    tok = tokenizer(CHATML)
    out = render_chat(conversation(), tok)
    messages = [{"role": "user", "content": "<image>\nwhat colour is the circle"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "and the square"}, {"role": "assistant", "content": "blue"}]
    assert flat(out) == tok.apply_chat_template(messages, tokenize=False)
    assert supervised(out) == ["red<|im_end|>\n", "blue<|im_end|>\n"]
    assert all(s.ends_turn for s in out if isinstance(s, TextSegment) and s.supervised)
    assert not is_chat(out), "a rendered conversation is never rendered again"


def test_generation_prompt_and_system_prompt():
    tok = tokenizer(CHATML)
    segs = [ImageSegment(jpeg_bytes(0)), TextSegment("what colour is the circle", role="user")]
    out = render_chat(segs, tok, system_prompt="describe it", add_generation_prompt=True)
    assert flat(out).startswith("<|im_start|>system\ndescribe it<|im_end|>\n<|im_start|>user\n<image>\n")
    assert flat(out).endswith("<|im_start|>assistant\n")
    assert supervised(out) == []


def test_template_refusing_system_gets_it_in_the_first_turn_and_bos_is_dropped():
    tok = tokenizer(LLAMA2)
    out = render_chat(conversation(), tok, system_prompt="describe it")
    text = flat(out)
    assert text.startswith("[INST] describe it\n\n<image>\nwhat colour is the circle [/INST]")
    assert "<s>[INST] and the square" in text  # a later BOS inside the template is kept
    assert supervised(out) == ["red </s>", "blue </s>"]


def test_llava_v1_without_template():
    tok = tokenizer()
    out = render_chat(conversation(), tok)
    assert flat(out) == (f"{LLAVA_SYSTEM} USER: <image>\nwhat colour is the circle ASSISTANT: red"
                         "USER: and the square ASSISTANT: blue")
    assert supervised(out) == ["red", "blue"]
    assert not any(s.ends_turn for s in out if isinstance(s, TextSegment))  # the tokenizer adds </s>


@pytest.mark.parametrize("template", [CHATML, LLAMA2, None])
def test_tokenized_labels_are_answers_and_one_end_of_turn(template):
    tok = tokenizer(template)
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<image>"), bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    st = SampleTokenizer(tok, tokens_per_image=3, max_length=256, **ids)
    out = st(Sample(conversation(), key="k"))
    labelled = [t for t, lab in zip(out.input_ids, out.labels) if lab != IGNORE_INDEX]
    decoded = tok.decode(labelled)
    assert decoded.split()[0] == "red" and "blue" in decoded
    eos = tok.eos_token_id
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = labelled.count(eos) + (labelled.count(im_end) if template == CHATML else 0)
    assert ends == 2, f"one end-of-turn per answer: {decoded!r}"
    assert out.input_ids.count(ids["image_token_id"]) == 3
    assert out.input_ids[0] == tok.bos_token_id and out.input_ids[1] != tok.bos_token_id


def test_a_conversation_the_template_refuses_is_skipped_and_counted(caplog):
    """Templates that enforce user/assistant alternation (Llama-2, Mistral, Gemma) raise on a conversation that
    opens with an assistant turn (ShareGPT records in LLaVA's SFT mix do): that sample is skipped and counted
    as bad_conversation (its key logged once), the run goes on; render_chat itself says what was refused."""
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
              "[INST] {{ m['content'] }} [/INST]{% endfor %}")
    tok = tokenizer(strict)
    st = SampleTokenizer(tok, image_token_id=tok.convert_tokens_to_ids("<image>"), tokens_per_image=3,
                         max_length=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    skips = SkipCounter()
    opens_with_answer = [TextSegment("a picture of shapes", role="assistant"), *conversation()]
    with caplog.at_level("WARNING", logger="lvlm.data"):
        assert st(Sample(opens_with_answer, key="rec-5"), skips) is None
        assert st(Sample(opens_with_answer, key="rec-6"), skips) is None
    assert skips.as_dict() == {"bad_conversation": 2}
    assert "rec-5" in caplog.text and "rec-6" not in caplog.text
    assert st(Sample(conversation(), key="ok"), skips) is not None      # the well-formed ones still train
    with pytest.raises(ChatFormatError, match="turns: assistant / user / assistant / user / assistant.*alternate"):
        render_chat(opens_with_answer, tok)


def test_captions_and_documents_are_not_chats():
    assert not is_chat([ImageSegment(b""), TextSegment("a red circle")])
    assert not is_chat([TextSegment("text"), ImageSegment(b""), TextSegment("more")])


def test_llava_json_chat_format_keeps_prompts_and_plain_drops_them(tmp_path):
    from lvlm.config.schema import LLaVAJsonSourceConfig
    from lvlm.data.skips import SkipCounter
    from lvlm.data.sources import build_source

    from data_fixtures import write_llava

    json_path, folder = write_llava(str(tmp_path), 3)
    chat = build_source(LLaVAJsonSourceConfig(json_path=json_path, image_folder=folder, format="chat"))
    plain = build_source(LLaVAJsonSourceConfig(json_path=json_path, image_folder=folder))
    c = next(iter(chat.iter_samples(0, 0, SkipCounter())))
    p = next(iter(plain.iter_samples(0, 0, SkipCounter())))
    assert is_chat(c.segments) and [s.role for s in c.segments[1:]] == ["user", "assistant"]
    assert not is_chat(p.segments)
    tok = tokenizer(CHATML)
    st = SampleTokenizer(tok, tokens_per_image=2, max_length=256, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = st(c)
    prompt_ids = tok("describe the image briefly", add_special_tokens=False)["input_ids"]
    joined = " ".join(map(str, out.input_ids))
    assert " ".join(map(str, prompt_ids)) in joined  # the prompt is in the sequence ...
    labelled = [t for t, lab in zip(out.input_ids, out.labels) if lab != IGNORE_INDEX]
    assert labelled == tok(c.segments[-1].text + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="format='dialog'.*'plain', 'chat'"):
        build_source(LLaVAJsonSourceConfig(json_path=json_path, image_folder=folder, format="dialog"))


def test_llava_json_text_only_records_are_text_only_conversations(tmp_path):
    """LLaVA-1.5's SFT mix (llava_v1_5_mix665k.json) holds ~41K ShareGPT records without an "image" key; they
    are text-only conversations (the loader refused the whole file before), tokenized with no image tokens."""
    import json

    from lvlm.config.schema import LLaVAJsonSourceConfig
    from lvlm.data.skips import SkipCounter
    from lvlm.data.sources import build_source

    from data_fixtures import write_llava

    json_path, folder = write_llava(str(tmp_path), 3)
    records = json.loads(open(json_path).read())
    records.append({"id": "sharegpt-1", "conversations": [{"from": "human", "value": "what is a circle?"},
                                                          {"from": "gpt", "value": "a round shape"}]})
    open(json_path, "w").write(json.dumps(records))
    chat = build_source(LLaVAJsonSourceConfig(json_path=json_path, image_folder=folder, format="chat"))
    skips = SkipCounter()
    samples = {s.key: s for s in chat.iter_samples(0, 0, skips)}
    assert len(samples) == 4 and skips.total == 0
    text_only = samples["sharegpt-1"]
    assert text_only.num_images == 0 and [s.role for s in text_only.segments] == ["user", "assistant"]
    assert all(s.num_images == 1 for k, s in samples.items() if k != "sharegpt-1")
    tok = tokenizer(CHATML)
    image_id = tok.convert_tokens_to_ids("<image>")
    st = SampleTokenizer(tok, tokens_per_image=2, max_length=256, image_token_id=image_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = st(text_only)
    assert image_id not in out.input_ids and any(lab != IGNORE_INDEX for lab in out.labels)
    records[0]["image"] = ""
    open(json_path, "w").write(json.dumps(records))
    with pytest.raises(ValueError, match=r"record 0 is malformed: 'image' must be a non-empty string \(or absent"):
        build_source(LLaVAJsonSourceConfig(json_path=json_path, image_folder=folder, format="chat"))

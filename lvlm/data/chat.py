"""Chat formatting: a conversation ``Sample`` laid out by the LLM's chat template, cut for labels.

Owns: turning role-tagged segments (user / system / assistant ``TextSegment``s and ``ImageSegment``s)
into exactly the text the tokenizer's chat template renders, cut into pieces so that labels are set
per piece:

- template scaffolding (role headers, separators, a default system prompt) and user/system content:
  unsupervised;
- assistant content plus the end-of-turn text the template writes right after it (``</s>``,
  ``<|im_end|>``, ``<|eot_id|>`` ...): supervised, marked ``ends_turn`` so no second EOS is added.

The split is found with sentinels: every message's content is rendered as a unique marker, the
rendered string is cut at the markers, and an assistant turn's end-of-turn text is what the template
writes after that message when the conversation ends there. Images stay inside their message, in
order, each followed by a newline when text follows (LLaVA's ``<image>\\n``). A leading BOS string is
dropped (the data side adds BOS itself).

Without a chat template the LLaVA v1 format is used:
``{system} USER: {user} ASSISTANT: {assistant}</s>USER: ...`` (the EOS comes from the tokenizer).

Assumes the template accepts string contents and the roles ``system``/``user``/``assistant``;
a template that refuses a system message gets the system prompt prepended to the first user turn.
"""
from __future__ import annotations

from typing import Optional

from lvlm.config.schema import LLAVA_SYSTEM
from lvlm.data.sample import ImageSegment, Segment, TextSegment

__all__ = ["LLAVA_SYSTEM", "is_chat", "render_chat"]


class ChatFormatError(ValueError):
    """The tokenizer's chat template cannot format a conversation (it raised, e.g. "roles must alternate",
    or dropped a message): a property of that one sample, which the data path skips and counts."""


def _marker(i: int) -> str:
    return f"\x00LVLM{i}\x00"


def is_chat(segments: list[Segment]) -> bool:
    """A sample is a conversation when it has a user turn (captions and documents have none)."""
    return any(isinstance(s, TextSegment) and s.role == "user" for s in segments)


def _messages(segments: list[Segment]) -> list[tuple[str, list[Segment]]]:
    """Consecutive segments grouped into (role, segments); an image joins the message of the next text
    (the previous one when nothing follows)."""
    groups: list[tuple[str, list[Segment]]] = []
    pending: list[Segment] = []
    for seg in segments:
        if isinstance(seg, ImageSegment):
            pending.append(seg)
            continue
        if groups and groups[-1][0] == seg.role and not pending:
            groups[-1][1].append(seg)
        else:
            groups.append((seg.role, [*pending, seg]))
        pending = []
    if pending:
        if groups:
            groups[-1][1].extend(pending)
        else:
            groups.append(("user", pending))
    return groups


def _content(role: str, parts: list[Segment], supervised_role: str) -> list[Segment]:
    """A message's own segments, with LLaVA's newline after an image that text follows."""
    out: list[Segment] = []
    for k, seg in enumerate(parts):
        if isinstance(seg, ImageSegment):
            out.append(seg)
            if k + 1 < len(parts) and isinstance(parts[k + 1], TextSegment):
                out.append(TextSegment("\n", role="user"))
        else:
            out.append(TextSegment(seg.text, role=supervised_role if role == "assistant" else "user"))
    return out


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _with_system(tokenizer, messages: list[dict], system_prompt: str, add_generation_prompt: bool):
    """(messages, rendered) with the system prompt as a system message, or merged into the first user
    message when the template refuses system messages."""
    if not system_prompt or messages[0]["role"] == "system":
        return messages, _render(tokenizer, messages, add_generation_prompt)
    with_sys = [{"role": "system", "content": system_prompt}, *messages]
    try:
        return with_sys, _render(tokenizer, with_sys, add_generation_prompt)
    except Exception:  # jinja2 TemplateError raised by the template itself ("system role not supported")
        merged = [dict(m) for m in messages]
        merged[0]["content"] = f"{system_prompt}\n\n{merged[0]['content']}"
        return merged, _render(tokenizer, merged, add_generation_prompt)


def _template_pieces(groups, tokenizer, system_prompt: str, add_generation_prompt: bool) -> list[Segment]:
    messages = [{"role": role, "content": _marker(i)} for i, (role, _) in enumerate(groups)]
    messages, rendered = _with_system(tokenizer, messages, system_prompt, add_generation_prompt)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and rendered.startswith(bos):
        rendered = rendered[len(bos):]
    out: list[Segment] = []
    rest = rendered
    for i, (role, parts) in enumerate(groups):
        before, found, after = rest.partition(_marker(i))
        if not found:
            raise ChatFormatError(f"the chat template dropped message {i} ({role}); it cannot format this "
                                  "conversation")
        if before:
            out.append(TextSegment(before, role="system"))
        content = _content(role, parts, "assistant")
        rest = after
        if role == "assistant":
            at = next(k for k, m in enumerate(messages) if _marker(i) in m["content"])
            upto = messages[: at + 1]
            suffix = _render(tokenizer, upto, False).partition(_marker(i))[2]
            if suffix.strip() and rest.startswith(suffix):
                last = content[-1]
                if isinstance(last, TextSegment) and last.role == "assistant":
                    content[-1] = TextSegment(last.text + suffix, role="assistant", ends_turn=True)
                else:
                    content.append(TextSegment(suffix, role="assistant", ends_turn=True))
                rest = rest[len(suffix):]
        out.extend(content)
    if rest:
        out.append(TextSegment(rest, role="system"))
    return out


def _llava_v1_pieces(groups, system_prompt: str, add_generation_prompt: bool) -> list[Segment]:
    out: list[Segment] = [TextSegment(f"{system_prompt or LLAVA_SYSTEM} ", role="system")]
    for role, parts in groups:
        if role == "system":
            out[0] = TextSegment(" ".join(s.text for s in parts if isinstance(s, TextSegment)) + " ", role="system")
            continue
        out.append(TextSegment("USER: " if role == "user" else "ASSISTANT: ", role="system"))
        out.extend(_content(role, parts, "assistant"))
        if role == "user":
            out.append(TextSegment(" ", role="system"))
    if add_generation_prompt:
        out.append(TextSegment("ASSISTANT: ", role="system"))
    return out


def _merge(pieces: list[Segment]) -> list[Segment]:
    """Adjacent unsupervised texts become one (tokenized together, as the template rendered them), with
    role ``system``: a rendered conversation has no ``user`` segment left, so it is never rendered twice."""
    out: list[Segment] = []
    for seg in pieces:
        if isinstance(seg, TextSegment) and not seg.text:
            continue
        if isinstance(seg, TextSegment) and not seg.supervised:
            prev = out[-1] if out else None
            if isinstance(prev, TextSegment) and not prev.supervised:
                out[-1] = TextSegment(prev.text + seg.text, role="system")
            else:
                out.append(TextSegment(seg.text, role="system"))
        else:
            out.append(seg)
    return out


def render_chat(segments: list[Segment], tokenizer, system_prompt: str = "",
                add_generation_prompt: bool = False, template: Optional[bool] = None) -> list[Segment]:
    """The segments of one conversation in the tokenizer's chat format (see the module docstring).

    ``template``: use the tokenizer's chat template (default: when it has one) or LLaVA v1 (False)."""
    groups = _messages(segments)
    if not groups:
        return []
    use_template = bool(getattr(tokenizer, "chat_template", None)) if template is None else template
    if use_template:
        from jinja2 import TemplateError  # what a template's raise_exception(...) raises

        try:
            pieces = _template_pieces(groups, tokenizer, system_prompt, add_generation_prompt)
        except TemplateError as e:
            roles = " / ".join(role for role, _ in groups)
            raise ChatFormatError(f"the chat template refuses this conversation (turns: {roles}): {e}") from e
    else:
        pieces = _llava_v1_pieces(groups, system_prompt, add_generation_prompt)
    return _merge(pieces)

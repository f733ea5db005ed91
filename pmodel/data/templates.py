"""Chat templates: render conversations to token ids with prompt labels masked.

A conversation is a list of :class:`Message` (``system`` / ``user`` / ``assistant``). A
:class:`ChatTemplate` turns it into *segments* -- the prompt part of each turn (system,
previous separator, user message, assistant header) and the response part (assistant
content and its end marker). Each segment is tokenised separately and the ids are
concatenated; prompt segments get label ``IGNORE_INDEX`` (-100) and response segments get
their own ids as labels. Masking is therefore exact by construction, by token position --
never by re-tokenising a prefix and hoping the boundary lines up.

Inside a template string, ``{content}`` is the message text (never scanned for special
tokens), ``{bos}`` / ``{eos}`` are the tokenizer's BOS / EOS ids, and every string listed in
``ChatTemplate.specials`` (role markers such as ``<|im_start|>``) becomes its special id when
the tokenizer has one, else it is tokenised as text.

SentencePiece's dummy prefix: text right after BOS or a special id is encoded as a fresh
string (one leading space folded into the dummy prefix); text after text is encoded as a
continuation (no dummy prefix). This reproduces the reference encodings of Llama-2
(``<s>[INST] ...``) and of Mistral v3 control tokens.

Formats (sources are cited in ``docs/data.md``): ``empty``, ``default``, ``alpaca``,
``llama2``, ``llama3``, ``mistral``, ``chatml`` (alias ``qwen``), ``chatglm3``, ``gemma``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

from .tokenizers import Tokenizer

__all__ = ["IGNORE_INDEX", "Message", "ChatTemplate", "TEMPLATES", "get_template", "Rendered",
           "render", "render_text"]

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, kw_only=True)
class Message:
    """One chat message.

    Args:
        role: ``system``, ``user`` or ``assistant``.
        content: the text.
    """

    role: str
    content: str

    def __post_init__(self):
        if self.role not in _ROLES:
            raise ValueError(f"message role {self.role!r}: expected one of {_ROLES}")
        if not isinstance(self.content, str):
            raise TypeError(f"message content must be a string, got {type(self.content).__name__}")


@dataclass(frozen=True, kw_only=True)
class ChatTemplate:
    """A chat format.

    Args:
        name: template name.
        prefix: emitted once at the start of the conversation (prompt).
        system: system message format (``{content}``), or ``None`` to fold the system text into
            the first user message with ``system_fold``.
        system_fold: format of the first user message when a system text is folded in
            (``{system}`` and ``{content}``).
        user: user turn format, including the assistant header (prompt).
        assistant: assistant turn format (response: labelled).
        separator: emitted after each assistant turn except the last (prompt).
        end: appended to the last assistant turn only (labelled), e.g. ChatGLM3's EOS.
        default_system: system text used when the conversation has none.
        specials: role-marker strings that map to special ids when the tokenizer has them.
        user_with_input: alpaca only: format for (instruction, input) records.
        system_with_input: alpaca only: default system text for records with an input.
    """

    name: str
    prefix: str = ""
    system: str | None = None
    system_fold: str = "{system}\n\n{content}"
    user: str = "{content}"
    assistant: str = "{content}{eos}"
    separator: str = ""
    end: str = ""
    default_system: str = ""
    specials: tuple[str, ...] = ()
    user_with_input: str | None = None
    system_with_input: str | None = None

    def __post_init__(self):
        for fname in ("user", "assistant"):
            if "{content}" not in getattr(self, fname):
                raise ValueError(f"template {self.name!r}: {fname} format lacks {{content}}")
        if self.system is not None and "{content}" not in self.system:
            raise ValueError(f"template {self.name!r}: system format lacks {{content}}")

    def join_input(self, instruction: str, inp: str) -> str:
        """Merge an alpaca ``instruction`` and ``input`` into one user message."""
        if not inp:
            return instruction
        if self.user_with_input is not None:
            return instruction + "\n\n### Input:\n" + inp
        return instruction + "\n" + inp


_ALPACA_SYS = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.\n\n")
_ALPACA_SYS_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes "
                     "the request.\n\n")

_TEMPLATE_LIST = [
    ChatTemplate(name="empty"),
    # LLaMA-Factory's "default" template.
    ChatTemplate(name="default", system="{content}\n", user="Human: {content}\nAssistant:",
                 separator="\n"),
    # Stanford Alpaca (tatsu-lab/stanford_alpaca train.py PROMPT_DICT); multi-turn as in
    # LLaMA-Factory's alpaca template (turns separated by a blank line).
    ChatTemplate(name="alpaca", system="{content}", user="### Instruction:\n{content}\n\n### Response:\n",
                 separator="\n\n", default_system=_ALPACA_SYS,
                 user_with_input="### Instruction:\n{content}\n\n### Response:\n",
                 system_with_input=_ALPACA_SYS_INPUT),
    # Meta llama generation.py: each exchange is <s>[INST] u [/INST] a </s>.
    ChatTemplate(name="llama2", user="{bos}[INST] {content} [/INST]", assistant=" {content} {eos}",
                 system_fold="<<SYS>>\n{system}\n<</SYS>>\n\n{content}"),
    # Meta llama-models chat_format.py.
    ChatTemplate(name="llama3", prefix="{bos}",
                 system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                 user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 assistant="{content}<|eot_id|>",
                 specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    # Mistral-7B-Instruct chat_template: <s>[INST] u [/INST]a</s>[INST] u2 [/INST]a2</s>.
    ChatTemplate(name="mistral", prefix="{bos}", user="[INST] {content} [/INST]",
                 assistant="{content}{eos}", specials=("[INST]", "[/INST]")),
    # ChatML (Qwen): <|im_start|>role\ncontent<|im_end|>\n.
    ChatTemplate(name="chatml", system="<|im_start|>system\n{content}<|im_end|>\n",
                 user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
                 assistant="{content}<|im_end|>", separator="\n",
                 default_system="You are a helpful assistant.",
                 specials=("<|im_start|>", "<|im_end|>")),
    # ChatGLM3 tokenizer build_chat_input / LLaMA-Factory chatglm3.
    ChatTemplate(name="chatglm3", prefix="[gMASK]sop", system="<|system|>\n {content}",
                 user="<|user|>\n {content}<|assistant|>", assistant="\n {content}", end="{eos}",
                 specials=("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>")),
    # Gemma chat_template: system text folded into the first user turn.
    ChatTemplate(name="gemma", prefix="{bos}",
                 user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
                 assistant="{content}<end_of_turn>", separator="\n",
                 specials=("<start_of_turn>", "<end_of_turn>")),
]
# Read-only registry (no module-level mutable state); "qwen" is an alias of "chatml".
TEMPLATES: Mapping[str, ChatTemplate] = MappingProxyType(
    {**{t.name: t for t in _TEMPLATE_LIST}, "qwen": next(t for t in _TEMPLATE_LIST if t.name == "chatml")})
del _TEMPLATE_LIST


def get_template(name: str | None) -> ChatTemplate:
    """The template called ``name`` (``None`` -> ``empty``).

    Args:
        name: one of :data:`TEMPLATES`.

    Returns:
        The :class:`ChatTemplate`.
    """
    key = name or "empty"
    if key not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[key]


# -- rendering -----------------------------------------------------------------------------

# A part is ("text", str) for template text, ("content", str) for message text (never split
# on specials), ("special", str) for a role marker, or ("bos"|"eos", "").


def _parts(fmt: str, template: ChatTemplate, **values: str) -> list[tuple[str, str]]:
    """Split a format string into parts, substituting ``{content}`` / ``{system}``."""
    keys = ["{bos}", "{eos}"] + [f"{{{k}}}" for k in values]
    pieces = sorted(set(keys) | set(template.specials), key=len, reverse=True)
    pat = re.compile("|".join(re.escape(p) for p in pieces))
    out: list[tuple[str, str]] = []
    pos = 0
    for m in pat.finditer(fmt):
        if m.start() > pos:
            out.append(("text", fmt[pos:m.start()]))
        tok = m.group(0)
        if tok == "{bos}":
            out.append(("bos", ""))
        elif tok == "{eos}":
            out.append(("eos", ""))
        elif tok in keys:
            out.append(("content", values[tok[1:-1]]))
        else:
            out.append(("special", tok))
        pos = m.end()
    if pos < len(fmt):
        out.append(("text", fmt[pos:]))
    return out


def _segments(template: ChatTemplate, messages: Sequence[Message], *, with_input: bool = False):
    """Yield (parts, is_response, turn) in order; turn counts user/assistant exchanges."""
    msgs = list(messages)
    system = template.system_with_input if (with_input and template.system_with_input) else template.default_system
    if msgs and msgs[0].role == "system":
        system = msgs[0].content
        msgs = msgs[1:]
    if not msgs:
        raise ValueError("conversation has no user message")
    for k, m in enumerate(msgs):
        want = "user" if k % 2 == 0 else "assistant"
        if m.role != want:
            raise ValueError(f"message {k}: expected role {want!r} (turns must alternate user/assistant "
                             f"after an optional system), got {m.role!r}")
    prompt: list[tuple[str, str]] = _parts(template.prefix, template)
    if template.system is not None and system:
        prompt += _parts(template.system, template, content=system)
    for k, m in enumerate(msgs):
        turn = k // 2
        if m.role == "user":
            if turn > 0:
                prompt += _parts(template.separator, template)
            user_fmt = template.user_with_input if (with_input and template.user_with_input) else template.user
            if turn == 0 and template.system is None and system:
                fold = _parts(template.system_fold, template, system=system, content=m.content)
                content = "".join(v for _, v in fold)  # folded text is all content
                prompt += _parts(user_fmt, template, content=content)
            else:
                prompt += _parts(user_fmt, template, content=m.content)
        else:
            yield prompt, False, turn
            prompt = []
            resp = _parts(template.assistant, template, content=m.content)
            if k == len(msgs) - 1:
                resp += _parts(template.end, template)
            yield resp, True, turn
    if prompt:
        yield prompt, False, len(msgs) // 2


def render_text(template: ChatTemplate | str, messages: Sequence[Message], *, bos: str = "<s>",
                eos: str = "</s>", with_input: bool = False) -> str:
    """The conversation as one string (for golden tests and inspection).

    Args:
        template: a template or its name.
        messages: the conversation.
        bos / eos: strings written for ``{bos}`` / ``{eos}``.
        with_input: alpaca records that carry an ``input``.

    Returns:
        The rendered string.
    """
    t = get_template(template) if isinstance(template, str) else template
    out = []
    for parts, _, _ in _segments(t, messages, with_input=with_input):
        for kind, v in parts:
            out.append(bos if kind == "bos" else eos if kind == "eos" else v)
    return "".join(out)


@dataclass(frozen=True, kw_only=True)
class Rendered:
    """A tokenised conversation (unshifted: ``labels[t]`` is ``ids[t]`` or -100).

    Args:
        ids: token ids.
        labels: ``ids`` on response tokens, ``IGNORE_INDEX`` on prompt tokens.
        turn_ends: index into ``ids`` just after each complete exchange (for truncation).
    """

    ids: list[int]
    labels: list[int]
    turn_ends: list[int] = field(default_factory=list)


def render(tokenizer: Tokenizer, template: ChatTemplate | str, messages: Sequence[Message], *,
           with_input: bool = False) -> Rendered:
    """Tokenise a conversation segment by segment with prompt labels masked.

    Args:
        tokenizer: the tokenizer.
        template: a template or its name.
        messages: the conversation: optional system, then user/assistant alternating.
        with_input: alpaca records that carry an ``input`` (alpaca template formats).

    Returns:
        :class:`Rendered` ids and labels.
    """
    t = get_template(template) if isinstance(template, str) else template
    ids: list[int] = []
    labels: list[int] = []
    turn_ends: list[int] = []
    after_special = True  # at the start, text is encoded as a fresh string
    for parts, is_response, turn in _segments(t, messages, with_input=with_input):
        seg: list[int] = []
        text_buf: list[str] = []

        def flush(before_special: bool = False):
            nonlocal after_special
            if not text_buf:
                return
            text = "".join(text_buf)
            text_buf.clear()
            if before_special and tokenizer.add_dummy_prefix and text.endswith(" "):
                # "[INST] u [/INST]" with control ids: the space belongs to the marker, as
                # mistral-common encodes [INST] + sp("u") + [/INST].
                text = text[:-1]
            if not text:
                return
            if after_special and not (ids or seg):
                seg.extend(tokenizer.encode(text))
            elif after_special and tokenizer.add_dummy_prefix and text.startswith(" "):
                seg.extend(tokenizer.encode(text[1:]))
            elif after_special and tokenizer.add_dummy_prefix and text[0].isspace():
                seg.extend(tokenizer.encode_continuation(text))
            elif after_special:
                seg.extend(tokenizer.encode(text) if tokenizer.add_dummy_prefix else tokenizer.encode_continuation(text))
            else:
                seg.extend(tokenizer.encode_continuation(text))
            after_special = False

        for kind, v in parts:
            if kind in ("text", "content"):
                text_buf.append(v)
                continue
            if kind == "special":
                sid = tokenizer.special_tokens.get(v)
                if sid is None:
                    text_buf.append(v)  # not a special in this vocabulary: plain text
                    continue
                flush(before_special=True)
                seg.append(sid)
            else:
                flush()
                seg.append(tokenizer._require("bos_id" if kind == "bos" else "eos_id"))
            after_special = True
        flush()
        ids.extend(seg)
        labels.extend(seg if is_response else [IGNORE_INDEX] * len(seg))
        if is_response:
            turn_ends.append(len(ids))
    return Rendered(ids=ids, labels=labels, turn_ends=turn_ends)

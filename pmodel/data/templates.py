"""Chat templates: render conversations to token ids with prompt labels masked.

A conversation is a list of :class:`Message` (``system`` / ``user`` / ``assistant``). A
:class:`ChatTemplate` turns it into *segments* -- the prompt part of each turn (system,
previous separator, user message, assistant header) and the response part (assistant
content and its end marker). Each segment is tokenised separately and the ids are
concatenated; prompt segments get label ``IGNORE_INDEX`` (-100) and response segments get
their own ids as labels. Masking is therefore exact by construction, by token position --
never by re-tokenising a prefix and hoping the boundary lines up.

Inside a template string, ``{content}`` is the message text (never scanned for special
tokens), ``{bos}`` / ``{eos}`` are the tokenizer's BOS / EOS ids, ``{add_bos}`` is its BOS ids
when the tokenizer adds them by default (``Tokenizer.add_bos``), and every string listed in
``ChatTemplate.specials`` (role markers such as ``<|im_start|>``) becomes its special id when
the tokenizer has one, else it is tokenised as text.

SentencePiece's dummy prefix: text right after BOS or a special id is encoded as a fresh
string (one leading space folded into the dummy prefix); text after text is encoded as a
continuation (no dummy prefix). This reproduces the reference encodings of Llama-2
(``<s>[INST] ...``) and of Mistral v3 control tokens.

Formats (sources are cited in ``docs/data.md``): ``empty``, ``default``, ``alpaca``,
``llama2``, ``llama3``, ``mistral``, ``chatml``, ``qwen``, ``chatglm3``, ``baichuan``,
``baichuan2``, ``internlm``, ``internlm2``, ``gemma``.
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
        encode_parts: tokenise every template text run and every message on its own (a fresh
            ``tokenizer.encode``, SentencePiece dummy prefix included), as the reference builds its
            ids piece by piece (ChatGLM3 ``build_single_message``, Qwen ``make_context``, Baichuan
            ``build_chat_input``) instead of as one text.
        stop_markers: special tokens besides EOS that end an assistant reply at inference (the
            reference's extra stop ids, e.g. ChatGLM3's ``<|user|>`` / ``<|observation|>``).
        joint_text: tokenise each run of text between special ids as one string and label the
            tokens from ``len(encode(text before the response))`` on, as Stanford Alpaca's
            ``train.py`` does (a token that straddles the prompt / response cut, e.g. ``:-``,
            counts as prompt), instead of segment by segment.
        trailer: text after the last assistant turn (prompt, unlabelled), so that a training
            conversation renders as the model's own template does (ChatML's ``<|im_end|>\n``,
            Gemma's ``<end_of_turn>\n``); dropped with the turn when a sample is truncated.
        fold_last_if_special: when the tokenizer has this special token, the system text is
            folded into the *last* user turn instead of the first (mistral-common's v2 / v3
            instruct tokenizers, whose ``[INST]`` is a control token; v1 folds into the first).
        fresh_after: role markers that, when they are plain text in the vocabulary, end a text
            run: the text after them is encoded as a fresh string (mistral-common v1 encodes
            ``"[INST] u [/INST]"`` and the answer with separate SentencePiece calls, so the
            answer gets the word-boundary space).
        strip_content: strip every message's content (Llama-3's ``| trim``).
        marker_ids: ids the role markers must have in the tokenizer (the reference hard-codes
            them, e.g. Baichuan2's ``user_token_id`` 195); rendering with a vocabulary that puts
            them elsewhere raises instead of writing the wrong ids (not checked for a
            :class:`~pmodel.data.ByteTokenizer`, whose test vocabulary numbers them itself).
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
    encode_parts: bool = False
    stop_markers: tuple[str, ...] = ()
    marker_ids: Mapping[str, int] = field(default_factory=dict)
    joint_text: bool = False
    trailer: str = ""
    fold_last_if_special: str = ""
    fresh_after: tuple[str, ...] = ()
    strip_content: bool = False

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


_AQUILA_SYS = ("A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's questions.")
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
    # PROMPT_DICT ends "### Response:" and train.py appends f"{output}{eos_token}"; its tokenizer
    # call adds BOS when the tokenizer does by default ({add_bos}).
    ChatTemplate(name="alpaca", prefix="{add_bos}", system="{content}",
                 user="### Instruction:\n{content}\n\n### Response:",
                 separator="\n\n", default_system=_ALPACA_SYS,
                 user_with_input="### Instruction:\n{content}\n\n### Response:",
                 system_with_input=_ALPACA_SYS_INPUT, joint_text=True),
    # Meta llama generation.py: each exchange is <s>[INST] u [/INST] a </s>.
    ChatTemplate(name="llama2", user="{bos}[INST] {content} [/INST]", assistant=" {content} {eos}",
                 system_fold="<<SYS>>\n{system}\n<</SYS>>\n\n{content}"),
    # Meta llama-models chat_format.py.
    ChatTemplate(name="llama3", prefix="{bos}", strip_content=True,
                 system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                 user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 assistant="{content}<|eot_id|>",
                 specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    # Mistral-7B-Instruct chat_template: <s>[INST] u [/INST]a</s>[INST] u2 [/INST]a2</s>.
    # mistral-common: v1 (text markers) encodes "[INST] u [/INST]" and the answer separately and
    # folds the system prompt into the first user turn; v2 / v3 (control [INST]) into the last.
    ChatTemplate(name="mistral", prefix="{bos}", user="[INST] {content} [/INST]",
                 assistant="{content}{eos}", specials=("[INST]", "[/INST]"),
                 fold_last_if_special="[INST]", fresh_after=("[/INST]",)),
    # ChatML as Qwen1.5 / Qwen2's tokenizer_config chat_template writes it (one text between
    # the markers): <|im_start|>role\ncontent<|im_end|>\n.
    ChatTemplate(name="chatml", trailer="\n", system="<|im_start|>system\n{content}<|im_end|>\n",
                 user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
                 assistant="{content}<|im_end|>", separator="\n",
                 default_system="You are a helpful assistant.",
                 specials=("<|im_start|>", "<|im_end|>")),
    # Qwen (v1) qwen_generation_utils.make_context (chat_format "chatml"): the same text, with
    # role, "\n" and content tokenised separately; chat()'s default system message.
    ChatTemplate(name="qwen", trailer="\n", system="<|im_start|>system\n{content}<|im_end|>\n",
                 user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
                 assistant="{content}<|im_end|>", separator="\n",
                 default_system="You are a helpful assistant.",
                 specials=("<|im_start|>", "<|im_end|>"), encode_parts=True),
    # ChatGLM3 tokenization_chatglm.py: build_inputs_with_special_tokens prefix [gMASK] sop;
    # build_single_message = role id + encode(f"{metadata}\n") + encode(content) (metadata "");
    # build_chat_input ends with <|assistant|>. Training (finetune_demo): the assistant message
    # after its role id is the response; one EOS at the end.
    ChatTemplate(name="chatglm3", prefix="[gMASK]sop", system="<|system|>\n{content}",
                 user="<|user|>\n{content}<|assistant|>", assistant="\n{content}", end="{eos}",
                 specials=("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>"), encode_parts=True,
                 stop_markers=("<|user|>", "<|observation|>"),  # generation eos_token_id [2, 64795, 64797]
                 marker_ids={"[gMASK]": 64790, "sop": 64792, "<|system|>": 64794, "<|user|>": 64795,
                             "<|assistant|>": 64796}),
    # Baichuan-13B-Chat modeling_baichuan.py _build_chat_input and Baichuan2 generation_utils.py
    # build_chat_input: user_token_id + content, assistant_token_id + content (v1: + EOS), no
    # separator; the prompt ends with assistant_token_id; Baichuan2 puts the system ids first
    # (no role id; v1 has no system message, the same is done). The role ids are 195 / 196 in
    # both vocabularies, which name them differently. Baichuan2 training (fine-tune.py): one EOS
    # after the last response.
    ChatTemplate(name="baichuan", system="{content}", user="<reserved_102>{content}<reserved_103>",
                 assistant="{content}{eos}", specials=("<reserved_102>", "<reserved_103>"),
                 encode_parts=True, marker_ids={"<reserved_102>": 195, "<reserved_103>": 196}),
    ChatTemplate(name="baichuan2", system="{content}", user="<reserved_106>{content}<reserved_107>",
                 assistant="{content}", end="{eos}", specials=("<reserved_106>", "<reserved_107>"),
                 encode_parts=True, marker_ids={"<reserved_106>": 195, "<reserved_107>": 196}),
    # InternLM (v1) modeling_internlm.py build_inputs: <|User|>:{q}<eoh>\n<|Bot|>:{a}<eoa>\n per
    # turn; one BOS at the start (as chatglm.cpp and LLaMA-Factory "intern"; the remote code's
    # tokenizer call adds a second one before its literal "<s>", see docs/data.md).
    ChatTemplate(name="internlm", prefix="{bos}", user="<|User|>:{content}<eoh>\n<|Bot|>:",
                 assistant="{content}<eoa>", separator="\n", specials=("<eoh>", "<eoa>"),
                 marker_ids={"<eoh>": 103027, "<eoa>": 103028}),
    # InternLM2-chat tokenizer_config chat_template: BOS, then ChatML (no default system).
    ChatTemplate(name="internlm2", prefix="{bos}", trailer="\n", system="<|im_start|>system\n{content}<|im_end|>\n",
                 user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
                 assistant="{content}<|im_end|>", separator="\n", specials=("<|im_start|>", "<|im_end|>"),
                 marker_ids={"<|im_start|>": 92543, "<|im_end|>": 92542}),
    # Gemma chat_template: system text folded into the first user turn.
    ChatTemplate(name="gemma", prefix="{bos}", trailer="\n",
                 user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
                 assistant="{content}<end_of_turn>", separator="\n",
                 specials=("<start_of_turn>", "<end_of_turn>")),
    # Aquila / Aquila2 chat (FlagAI conversation.py): "aquila" is ADD_COLON_TWO with "###" / "</s>"
    # separators, "aquila-v2" NO_COLON_TWO with <|startofpiece|> / <|endofpiece|> role markers.
    ChatTemplate(name="aquila", system="{content}###", user="Human: {content}###Assistant:",
                 assistant=" {content}{eos}", default_system=_AQUILA_SYS),
    ChatTemplate(name="aquila-v2", system="{content}", user="<|startofpiece|>{content}<|endofpiece|>",
                 assistant="{content}{eos}", default_system=_AQUILA_SYS + "\n\n",
                 specials=("<|startofpiece|>", "<|endofpiece|>"),
                 stop_markers=("<|startofpiece|>", "<|endofpiece|>")),
]
# Read-only registry (no module-level mutable state).
TEMPLATES: Mapping[str, ChatTemplate] = MappingProxyType({t.name: t for t in _TEMPLATE_LIST})
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
    keys = ["{bos}", "{eos}", "{add_bos}"] + [f"{{{k}}}" for k in values]
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
        elif tok == "{add_bos}":
            out.append(("add_bos", ""))
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


def _segments(template: ChatTemplate, messages: Sequence[Message], *, with_input: bool = False,
              fold_last: bool = False):
    """Yield (parts, is_response, turn) in order; turn counts user/assistant exchanges."""
    msgs = list(messages)
    if template.strip_content:
        msgs = [Message(role=m.role, content=m.content.strip()) for m in msgs]
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
            fold_at = (max(i for i, x in enumerate(msgs) if x.role == "user") if fold_last else 0)
            if k == fold_at and template.system is None and system:
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
    if msgs[-1].role == "assistant" and template.trailer:
        prompt += _parts(template.trailer, template)
    if prompt:
        yield prompt, False, len(msgs) // 2


def render_text(template: ChatTemplate | str, messages: Sequence[Message], *, bos: str = "<s>",
                eos: str = "</s>", with_input: bool = False, fold_last: bool = False) -> str:
    """The conversation as one string (for golden tests and inspection).

    Args:
        template: a template or its name.
        messages: the conversation.
        bos / eos: strings written for ``{bos}`` / ``{eos}``.
        with_input: alpaca records that carry an ``input``.
        fold_last: fold the system text into the last user turn (what :func:`render` does when
            the tokenizer has the template's ``fold_last_if_special`` token).

    Returns:
        The rendered string.
    """
    t = get_template(template) if isinstance(template, str) else template
    out = []
    for parts, _, _ in _segments(t, messages, with_input=with_input, fold_last=fold_last):
        for kind, v in parts:
            out.append(bos if kind == "bos" else eos if kind == "eos" else "" if kind == "add_bos" else v)
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
    # (a ByteTokenizer numbers its specials itself: a synthetic vocabulary for tests)
    for marker, want in (t.marker_ids.items() if tokenizer.family != "bytes" else ()):
        got = tokenizer.special_tokens.get(marker)
        if got != want:
            raise ValueError(f"chat template {t.name!r} needs {marker!r} = id {want} (the reference hard-codes it), "
                             f"but tokenizer {tokenizer.path or type(tokenizer).__name__} has "
                             f"{'no such token' if got is None else f'id {got}'}; use the template of its family")
    if t.joint_text:
        return _render_joint(tokenizer, t, messages, with_input)
    fold_last = bool(t.fold_last_if_special) and t.fold_last_if_special in tokenizer.special_tokens
    ids: list[int] = []
    labels: list[int] = []
    turn_ends: list[int] = []
    after_special = True  # at the start, text is encoded as a fresh string
    for parts, is_response, turn in _segments(t, messages, with_input=with_input, fold_last=fold_last):
        seg: list[int] = []
        text_buf: list[str] = []

        def flush(before_special: bool = False):
            nonlocal after_special
            if not text_buf:
                return
            text = "".join(text_buf)
            text_buf.clear()
            if t.encode_parts:  # each part is its own tokenizer.encode call, as the reference does
                seg.extend(tokenizer.encode(text))
                after_special = False
                return
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
                if t.encode_parts:
                    flush()
                text_buf.append(v)
                if t.encode_parts:
                    flush()
                continue
            if kind == "special":
                sid = tokenizer.special_tokens.get(v)
                if sid is None:
                    text_buf.append(v)  # not a special in this vocabulary: plain text
                    if v in t.fresh_after:
                        flush()
                        after_special = True  # the next text is a fresh encode
                    continue
                flush(before_special=True)
                seg.append(sid)
            elif kind == "add_bos":  # the tokenizer's default BOS (transformers' tokenizer(text))
                if not tokenizer.add_bos:
                    continue
                flush()
                seg.extend(tokenizer.bos_ids)
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


def _render_joint(tokenizer: Tokenizer, t: ChatTemplate, messages: Sequence[Message], with_input: bool) -> Rendered:
    """``joint_text`` rendering: one ``encode`` per run of text between special ids; response
    labels start at the token count of the run's text before the response (Stanford Alpaca)."""
    ids: list[int] = []
    labels: list[int] = []
    turn_ends: list[int] = []
    run: list[str] = []
    spans: list[tuple[int, int]] = []  # response character spans inside the run

    def flush():
        text = "".join(run)
        if not text:
            return
        enc = tokenizer.encode(text)  # fresh: at the start or after a special id
        lab = [IGNORE_INDEX] * len(enc)
        for a, b in spans:
            na = len(tokenizer.encode(text[:a])) if a else 0
            nb = len(enc) if b >= len(text) else len(tokenizer.encode(text[:b]))
            lab[na:nb] = enc[na:nb]
        ids.extend(enc)
        labels.extend(lab)
        run.clear()
        spans.clear()

    for parts, is_response, _ in _segments(t, messages, with_input=with_input):
        for kind, v in parts:
            if kind in ("text", "content") or (kind == "special" and v not in tokenizer.special_tokens):
                pos = sum(len(x) for x in run)
                run.append(v)
                if is_response and v:
                    spans.append((pos, pos + len(v)))
                continue
            flush()
            if kind == "add_bos":
                new = list(tokenizer.bos_ids) if tokenizer.add_bos else []
            elif kind == "special":
                new = [tokenizer.special_tokens[v]]
            else:
                new = [tokenizer._require("bos_id" if kind == "bos" else "eos_id")]
            ids.extend(new)
            labels.extend(new if is_response else [IGNORE_INDEX] * len(new))
        if is_response:
            flush()
            turn_ends.append(len(ids))
    flush()
    return Rendered(ids=ids, labels=labels, turn_ends=turn_ends)

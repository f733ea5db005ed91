"""A chat session on a chat template: history across turns, truncated from the oldest turn.

Each turn renders ``[system] + history + user`` with the template (the same
:func:`pmodel.data.templates.render` that training uses, so the prompt is tokenised exactly as
the fine-tuning data was) and streams the reply. When the prompt plus ``max_new_tokens`` would
not fit the context, the oldest exchanges are dropped first and a notice says how many; a
single message that cannot fit even alone is refused with its size.
"""
from __future__ import annotations

import re
from typing import Iterator

from ..data.templates import ChatTemplate, Message, get_template, render
from ..model import Model
from .engine import GenerationConfig, context_limit, stream

__all__ = ["ChatSession", "template_stops"]


def template_stops(template: ChatTemplate, tokenizer) -> tuple[list[int], list[str]]:
    """``(stop ids, stop strings)`` ending an assistant reply under ``template``.

    Stop ids: the tokenizer's EOS and the special markers the assistant format writes after the
    content (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``). Stop strings: the text that
    opens the next user turn when it is plain text (``Human:``, ``### Instruction:``, ``[INST]``
    in a vocabulary without such a special id), so a model that runs on into the next turn is
    cut where the turn would start.
    """
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    after = template.assistant.split("{content}", 1)[1]
    for s in template.specials:
        if s in after and tokenizer.special_tokens.get(s) is not None:
            ids.append(tokenizer.special_tokens[s])
    # Markers the template declares as ending a reply (ChatGLM3's <|user|>, <|observation|>).
    for s in getattr(template, "stop_markers", ()):
        if tokenizer.special_tokens.get(s) is not None:
            ids.append(tokenizer.special_tokens[s])
    strings = []
    head = template.user.split("{content}", 1)[0]
    head = re.sub(r"\{(bos|eos)\}", "", head)
    # A turn opened by a real special id ends the reply by the id (the assistant's end marker);
    # only a plain-text opener (Human:, ### Instruction:) is a stop string.
    if head.strip() and not any(s in head and tokenizer.special_tokens.get(s) is not None
                                for s in template.specials):
        strings.append(head.strip())
    return sorted(set(ids)), strings


class ChatSession:
    """A conversation with a model.

    Args:
      model, params, tokenizer: the model and its tokenizer.
      template: a template name or :class:`~pmodel.data.templates.ChatTemplate` (default: the
        model family's, else ``"default"``).
      system: the system prompt (None: the template's default).
      config: generation settings; the template's stop ids / strings are added to it.

    Attributes:
      history: the kept messages (user / assistant alternating).
      notices: what truncation did, one line per dropped batch of turns (the CLI prints them).
    """

    def __init__(self, model: Model, params, tokenizer, *, template: str | ChatTemplate | None = None,
                 system: str | None = None, config: GenerationConfig | None = None):
        if template is None:
            from .. import families
            try:
                template = families.get(model.family).chat_template if model.family else "default"
            except (KeyError, ValueError):
                template = "default"
        self.template = get_template(template) if isinstance(template, str) else template
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.system = system
        cfg = config or GenerationConfig(max_new_tokens=256)
        sids, sstr = template_stops(self.template, tokenizer)
        self.config = cfg.replace(stop_ids=tuple(dict.fromkeys(cfg.stop_ids + tuple(sids))),
                                  stop_strings=tuple(dict.fromkeys(cfg.stop_strings + tuple(sstr))))
        self.history: list[Message] = []
        self.notices: list[str] = []

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history = []

    def _messages(self, history, user: str) -> list[Message]:
        head = [Message(role="system", content=self.system)] if self.system else []
        return head + list(history) + [Message(role="user", content=user)]

    def prompt_ids(self, user: str) -> list[int]:
        """The prompt for the next turn, dropping the oldest exchanges until it fits the context
        with ``max_new_tokens`` to spare (a notice is appended to :attr:`notices`)."""
        limit = context_limit(self.model, self.config)
        budget = limit - self.config.max_new_tokens
        history = list(self.history)
        dropped = 0
        while True:
            ids = render(self.tokenizer, self.template, self._messages(history, user)).ids
            if len(ids) <= budget or not history:
                break
            history = history[2:]
            dropped += 1
        if len(ids) > budget:
            raise ValueError(f"the message needs {len(ids)} prompt tokens; with max_new_tokens "
                             f"{self.config.max_new_tokens} the context of {limit} leaves {budget}: shorten it")
        if dropped:
            self.history = history
            self.notices.append(f"[history truncated: dropped the {dropped} oldest exchange"
                                f"{'s' if dropped > 1 else ''} to fit the context of {limit} tokens]")
        return ids

    def send(self, user: str) -> Iterator[str]:
        """Stream the reply to ``user`` as text deltas; the exchange joins the history when done."""
        ids = self.prompt_ids(user)
        reply = []
        for deltas in stream(self.model, self.params, self.tokenizer, [ids], self.config):
            for d in deltas:
                if d.text:
                    reply.append(d.text)
                    yield d.text
        self.history += [Message(role="user", content=user), Message(role="assistant", content="".join(reply).strip())]

    def ask(self, user: str) -> str:
        """The whole reply (non-streaming :meth:`send`)."""
        return "".join(self.send(user))

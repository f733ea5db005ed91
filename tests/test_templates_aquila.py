"""Aquila / Aquila2 chat templates against FlagAI's own conversation.py (the official reference in
../shared/data/reference_code/aquila2): the rendered text of multi-turn conversations, with and
without a system message, complete and as a generation prompt, equals ``Conversation.get_prompt``.
(Token level is not checked: the shared Aquila tokenizer files lack the added ids 100000-100007,
among them ``</s>``, whose assignment the data README says is not verified.)"""
from __future__ import annotations

import importlib.util

import pytest

from _data_helpers import SHARED
from pmodel.data import Message, render_text

REF = SHARED / "reference_code" / "aquila2" / "conversation.py"
TURNS = [("Hello, who are you?", "I am Aquila."), ("2 + 2?", "4, of course.")]


def _reference():
    if not REF.exists():
        pytest.skip(f"{REF} not present (fresh clone)")
    spec = importlib.util.spec_from_file_location("_ref_aquila_conversation", REF)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["aquila", "aquila-v2"])
@pytest.mark.parametrize("system", [None, "You are terse."])
@pytest.mark.parametrize("generation", [False, True])
def test_rendered_text_equals_flagai(name, system, generation):
    conv = _reference().get_conv_template(name)
    if system is not None:
        conv.set_system_message(system)
    msgs = [] if system is None else [Message(role="system", content=system)]
    for i, (u, a) in enumerate(TURNS):
        last = i == len(TURNS) - 1
        conv.append_message(conv.roles[0], u)
        conv.append_message(conv.roles[1], None if (last and generation) else a)
        msgs.append(Message(role="user", content=u))
        if not (last and generation):
            msgs.append(Message(role="assistant", content=a))
    assert render_text(name, msgs) == conv.get_prompt()

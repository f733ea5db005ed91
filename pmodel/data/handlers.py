"""ModelLink's dataset handlers (``modellink/data/data_handler.py``), record by record.

Each handler turns one input record into one output document: for every output key, a list of
token sequences (usually one). ModelLink runs the same code through ``datasets.map``; the
formats below are transcribed from ModelLink at commit ``9252dc9`` (the commit of the example
scripts in ``../shared/data/modellink_examples``), including its quirks, so that a ModelLink
user gets the ids ModelLink writes:

* ``GeneralPretrainHandler``: each ``json_keys`` text, tokenised as the Hugging Face tokenizer
  call does (BOS when the tokenizer adds it by default, :attr:`Tokenizer.add_bos`), plus EOD
  with ``append_eod``.
* ``AlpacaPretrainHandler``: an Alpaca record rendered into ModelLink's conversation text
  (``"...### Instruction:\\n{instruction}\\n\\n###{inputs}\\n\\n### Response: ASSISTANT: {output}"``
  where ``inputs`` is ``" Input:\\n{input}"``, or the string ``None`` when the record has no
  input, exactly as ``str.format`` writes it in ModelLink) into the ``text`` key.
* ``StackOverflowPythonPretrainHandler``: ``"In python, {title}\\n### Question:\\n{question_body}\\n
  ### Response:\\n{answer_body}\\n"`` into ``text`` (ModelLink's ``_pre_process`` forgets to return
  the sample, so ModelLink itself fails on every record; the intended text is written here).
* ``GeneralInstructionHandler`` (Alpaca records), ``BelleMultiTurnInstructionHandler``
  (``Human:`` / ``Assistant:`` turns inside ``instruction``), ``LeetcodePythonInstructionHandler``
  (``code_with_problem``, ``code_only``, ``explanation_only``): ModelLink's ``Prompter`` with its
  ``AlpacaTemplate`` (``"\\n{system}\\n"`` then ``"### Instruction:\\n{user}\\n"`` /
  ``"### Response:\\n{assistant}\\n"``), the whole prompt tokenised at once, labels -100 on the
  first ``len(tokenize(prompt up to the last "### Response:" + "\\n"))`` tokens.
* ``MOSSInstructionHandler``: the same prompt for each growing prefix of a MOSS ``chat``; one
  sequence per turn, all in one document.
* ``MOSSMultiTurnHandler``: Baichuan's role ids 195 / 196 around each turn's separately
  encoded user / assistant text, labels ``[eos] + [-100]*len(user) + [-100] + assistant`` per
  turn, EOS at the end (as ModelLink writes them).

Output keys: ``text`` for the pretraining handlers (``{prefix}_text_document``), ``input_ids``,
``attention_mask``, ``labels`` for the instruction handlers (``{prefix}_packed_*_document``).
"""

from __future__ import annotations

from typing import Any, Mapping

from .instruction import RecordError
from .templates import IGNORE_INDEX
from .tokenizers import Tokenizer

__all__ = ["PRETRAIN_HANDLERS", "TEMPLATE_HANDLERS", "MODELLINK_INSTRUCTION_HANDLERS", "ALL_HANDLERS",
           "ALPACA_PRETRAIN_FORMAT", "MODELLINK_ALPACA_SYSTEM", "modellink_prompt", "pretrain_texts",
           "encode_modellink_instruction"]

PRETRAIN_HANDLERS = ("GeneralPretrainHandler", "AlpacaPretrainHandler", "StackOverflowPythonPretrainHandler")
TEMPLATE_HANDLERS = ("AlpacaStyleInstructionHandler", "SharegptStyleInstructionHandler")
MODELLINK_INSTRUCTION_HANDLERS = ("GeneralInstructionHandler", "BelleMultiTurnInstructionHandler",
                                  "MOSSMultiTurnHandler", "MOSSInstructionHandler",
                                  "LeetcodePythonInstructionHandler")
ALL_HANDLERS = PRETRAIN_HANDLERS + TEMPLATE_HANDLERS + MODELLINK_INSTRUCTION_HANDLERS

ALPACA_PRETRAIN_FORMAT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
    "USER: Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n###{inputs}\n\n### Response: ASSISTANT: {response}")
MODELLINK_ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. "
    "Please note that you need to think through your response logically and step by step.")
_USER_TOKEN, _ASSISTANT_TOKEN = "### Instruction:", "### Response:"


def _str(rec: Mapping[str, Any], key: str, *, required: bool = True, default: str = "") -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise RecordError("missing_key", f"missing key {key!r} (expected a string)")
        return default
    v = rec[key]
    if not isinstance(v, str):
        raise RecordError("wrong_type", f"key {key!r}: expected a string, got {type(v).__name__}")
    return v


def _obj(rec) -> Mapping[str, Any]:
    if not isinstance(rec, Mapping):
        raise RecordError("wrong_type", f"expected a JSON object, got {type(rec).__name__}")
    return rec


def pretrain_texts(handler: str, rec, json_keys: tuple[str, ...]) -> dict[str, str]:
    """The texts a pretraining handler tokenises for one record (key -> text).

    Raises:
        RecordError: missing keys, wrong types, empty text.
    """
    if handler == "GeneralPretrainHandler" and type(rec) is dict and len(json_keys) == 1:  # fast path
        v = rec.get(json_keys[0])
        if type(v) is str and v.strip():
            return {json_keys[0]: v}
    rec = _obj(rec)
    if handler == "AlpacaPretrainHandler":
        inp = _str(rec, "input", required=False)
        texts = {"text": ALPACA_PRETRAIN_FORMAT.format(
            instruction=_str(rec, "instruction"), inputs=f" Input:\n{inp}" if inp else None,
            response=_str(rec, "output"))}
    elif handler == "StackOverflowPythonPretrainHandler":
        texts = {"text": f"In python, {_str(rec, 'title')}\n### Question:\n{_str(rec, 'question_body')}\n"
                         f"### Response:\n{_str(rec, 'answer_body')}\n"}
    else:
        texts = {}
        for key in json_keys:
            texts[key] = _str(rec, key)
    for key, v in texts.items():
        if not v.strip():
            raise RecordError("empty_text", f"key {key!r}: empty text")
    return texts


def modellink_prompt(messages: list[tuple[str, str]]) -> str:
    """ModelLink ``Prompter(AlpacaTemplate()).generate_training_prompt`` (roles user / assistant)."""
    p = "\n" + MODELLINK_ALPACA_SYSTEM + "\n"
    for role, content in messages:
        p += (_USER_TOKEN if role == "user" else _ASSISTANT_TOKEN) + "\n" + content + "\n"
    return p


def _messages(handler: str, rec: Mapping[str, Any]) -> list[tuple[str, str]]:
    if handler == "LeetcodePythonInstructionHandler":
        return [("user", _str(rec, "code_with_problem").split("```", 1)[0].strip()),
                ("assistant", _str(rec, "code_only") + "\n" + _str(rec, "explanation_only"))]
    instruction, output = _str(rec, "instruction"), _str(rec, "output")
    if handler == "GeneralInstructionHandler":
        # ModelLink joins instruction and input with "\n" even when the input is empty
        return [("user", instruction + "\n" + _str(rec, "input", required=False)), ("assistant", output)]
    # BelleMultiTurnInstructionHandler: the turns live in `instruction`
    msgs: list[tuple[str, str]] = []
    for msg in instruction.split("Human:"):
        if not msg:
            continue
        tmp = msg.split("Assistant:")
        if len(tmp) > 1:
            msgs += [("user", tmp[0].strip()), ("assistant", tmp[1].strip())]
        else:
            msgs.append(("assistant", tmp[0].strip()))
    if not msgs:
        raise RecordError("empty_text", "no 'Human:' / 'Assistant:' turns in 'instruction'")
    msgs.pop()
    msgs.append(("assistant", output.strip()))
    return msgs


def _moss_turns(rec: Mapping[str, Any]) -> list[tuple[str, str]]:
    chat = rec.get("chat")
    if chat is None:
        raise RecordError("missing_key", "missing key 'chat' (expected an object of turns)")
    if not isinstance(chat, Mapping):
        raise RecordError("wrong_type", f"key 'chat': expected an object of turns, got {type(chat).__name__}")
    turns = []
    for name, turn in chat.items():
        if not turn:
            continue
        if not isinstance(turn, Mapping):
            raise RecordError("wrong_type", f"chat[{name!r}]: expected an object with 'Human' and 'MOSS'")
        user = _str(turn, "Human").replace("<eoh>", "").replace("<|Human|>: ", "").strip()
        assistant = _str(turn, "MOSS").replace("<|MOSS|>:", "").replace("<eom>", "").strip()
        turns.append((user, assistant))
    if not turns:
        raise RecordError("empty_text", "no turns in 'chat'")
    return turns


def _prompted(tok: Tokenizer, full: str, *, bos: bool, eod: bool) -> tuple[list[int], list[int]]:
    """ModelLink ``GeneralInstructionHandler._filter``: ids of the whole prompt, labels masked on
    the tokens of the prompt up to (and including) the last ``### Response:`` and its newline."""
    ids = tok.encode(full, bos=bos)
    labels = list(ids)
    if eod:
        ids.append(tok.eos_id)
        labels.append(tok.eos_id)
    user_prompt = full.rsplit(_ASSISTANT_TOKEN, maxsplit=1)[0] + _ASSISTANT_TOKEN + "\n"
    n = len(tok.encode(user_prompt, bos=bos))
    labels[:n] = [IGNORE_INDEX] * min(n, len(labels))
    return ids, labels


def encode_modellink_instruction(handler: str, rec, tok: Tokenizer, *, bos: bool,
                                 append_eod: bool) -> list[tuple[list[int], list[int]]]:
    """One document of a ModelLink instruction handler: ``[(input_ids, labels), ...]`` per sequence
    (``attention_mask`` is all ones).

    Args:
        handler: one of :data:`MODELLINK_INSTRUCTION_HANDLERS`.
        rec: the record.
        tok: the tokenizer.
        bos: prepend the tokenizer's BOS ids to each tokenised text (the HF tokenizer call's
            default, :attr:`Tokenizer.add_bos`, unless overridden).
        append_eod: append EOS to ids and labels (not for the MOSS handlers, refused upstream).
    """
    rec = _obj(rec)
    if handler == "MOSSMultiTurnHandler":
        eos = tok.eos_id
        ids: list[int] = []
        labels: list[int] = []
        for user, assistant in _moss_turns(rec):
            u, a = tok.encode(user, bos=bos), tok.encode(assistant, bos=bos)
            ids += [195] + u + [196] + a
            labels += [eos] + [IGNORE_INDEX] * len(u) + [IGNORE_INDEX] + a
        ids.append(eos)
        labels.append(eos)
        return [(ids, labels)]
    if handler == "MOSSInstructionHandler":
        msgs: list[tuple[str, str]] = []
        out = []
        for user, assistant in _moss_turns(rec):
            msgs += [("user", user), ("assistant", assistant)]
            out.append(_prompted(tok, modellink_prompt(msgs), bos=bos, eod=False))
        return out
    msgs = _messages(handler, rec)
    if not msgs[-1][1].strip():
        raise RecordError("empty_text", "empty response")
    return [_prompted(tok, modellink_prompt(msgs), bos=bos, eod=append_eod)]

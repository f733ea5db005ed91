"""Tokenizers behind one interface.

Four backends, all exposing the same :class:`Tokenizer` surface
(``encode``, ``encode_continuation``, ``decode``, ``bos_id``, ``eos_id``, ``pad_id``,
``special_tokens``, ``vocab_size``):

* :class:`SentencePieceTokenizer` -- SentencePiece ``.model`` files (LLaMA-1/2, Mistral,
  InternLM, stories260K, ...). SentencePiece itself is the reference.
* :class:`BPERankTokenizer` -- tiktoken rank files (``base64(token) rank`` per line):
  Llama-3 ``tokenizer.model`` and Qwen ``qwen.tiktoken``, run by ``tiktoken`` with each
  family's pre-tokenisation regex and special tokens.
* :class:`HFTokenizer` -- Hugging Face ``tokenizer.json`` or GPT-2-style ``vocab.json`` +
  ``merges.txt`` through the ``tokenizers`` package.

The backend libraries (``sentencepiece``, ``tiktoken``, ``tokenizers``) are runtime
dependencies, imported when a tokenizer of that kind is loaded. ``encode_batch`` goes through
each library's batch API.
* :class:`ByteTokenizer` -- a dependency-free byte-level tokenizer (256 byte ids, then the
  special tokens). Used for tests on a fresh clone and for quick experiments.

``encode`` never interprets special-token strings found in the text unless
``allow_special=True``: user content must not be able to forge control tokens. Chat
templates insert role markers explicitly (see :mod:`pmodel.data.templates`).
"""

from __future__ import annotations

import base64
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "BPERankTokenizer",
    "HFTokenizer",
    "ByteTokenizer",
    "load_tokenizer",
    "check_vocab_size",
    "LLAMA3_PATTERN",
    "QWEN_PATTERN",
    "GPT2_PATTERN",
    "llama3_special_tokens",
    "qwen_special_tokens",
    "SP_FAMILIES",
]

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """The common tokenizer interface (a base class; use :func:`load_tokenizer`).

    Attributes:
        vocab_size: number of ids the tokenizer can produce (max id + 1), specials included.
        bos_id / eos_id / pad_id: ids or ``None`` when the vocabulary has no such token.
        special_tokens: mapping from special-token string to id (role markers, BOS, EOS...).
        add_dummy_prefix: whether ``encode`` prepends a word-boundary marker (SentencePiece
            ``add_dummy_prefix``). Chat templates use it to tokenise segments as in one text.
        bos_ids: what ``encode(bos=True)`` prepends: ``(bos_id,)``, or the family's prefix
            (ChatGLM3: ``[gMASK] sop``).
        add_bos: whether the family's reference tokenizer prepends ``bos_ids`` by default
            (``tokenizer(text)`` in Hugging Face); ``encode`` itself never does unless asked.
        family: the tokenizer family (``"chatglm3"``, ``"baichuan2"``, ``"qwen"``, ...,
            ``"generic"``); see :func:`load_tokenizer`.
        path: the file the tokenizer was loaded from (for error messages).
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    special_tokens: Mapping[str, int]
    add_dummy_prefix: bool = False
    family: str = "generic"
    path: str = ""
    _bos_ids: tuple[int, ...] | None = None
    _add_bos: bool | None = None

    @property
    def bos_ids(self) -> tuple[int, ...]:
        if self._bos_ids is not None:
            return self._bos_ids
        return () if self.bos_id is None else (self.bos_id,)

    @property
    def add_bos(self) -> bool:
        return bool(self.bos_ids) if self._add_bos is None else self._add_bos

    def encode(self, text: str, *, bos: bool = False, eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """Encode text to ids.

        Args:
            text: the text.
            bos / eos: prepend :attr:`bos_ids` / append EOS (error if the tokenizer has none).
            allow_special: recognise special-token strings inside ``text``.

        Returns:
            The list of token ids.
        """
        ids: list[int] = []
        if bos:
            if not self.bos_ids:
                self._require("bos_id")
            ids.extend(self.bos_ids)
        if allow_special and self.special_tokens:
            for chunk, special in _split_special(text, self.special_tokens):
                if special is not None:
                    ids.append(special)
                elif chunk:
                    ids.extend(self._encode_text(chunk, first=len(ids) == (len(self.bos_ids) if bos else 0)))
        elif text:
            ids.extend(self._encode_text(text, first=True))
        if eos:
            ids.append(self._require("eos_id"))
        return ids

    def encode_continuation(self, text: str) -> list[int]:
        """Encode ``text`` as the continuation of a text already encoded.

        Same as ``encode`` except that SentencePiece's dummy prefix is not added, so that
        tokenising a string segment by segment gives the tokens of the whole string (up to
        merges across the cut).

        Args:
            text: the text (no special tokens are recognised).

        Returns:
            The list of token ids.
        """
        return self._encode_text(text, first=False) if text else []

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list[list[int]]:
        """Encode many texts: ``[encode(t) for t in texts]`` (no BOS / EOS, specials stay text),
        through the backend library's batch API where it has one.

        Args:
            texts: the texts.
            num_threads: threads the backend may use (1: the calling thread only, which is what
                a preprocessing worker process wants).

        Returns:
            One list of ids per text.
        """
        return [self._encode_text(t, first=True) if t else [] for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids back to text (special tokens are written out as their strings).

        Args:
            ids: token ids.

        Returns:
            The text.
        """
        raise NotImplementedError

    def _encode_text(self, text: str, first: bool) -> list[int]:
        raise NotImplementedError

    def _require(self, name: str) -> int:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"tokenizer {self.path or type(self).__name__} has no {name[:-3]} token")
        return value

    def id_of(self, token: str) -> int | None:
        """The id of a special token string, or ``None`` if the vocabulary has none."""
        return self.special_tokens.get(token)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")


def _split_special(text: str, specials: Mapping[str, int]):
    """Yield (chunk, None) for plain text and ("", id) for special tokens, longest match first."""
    import regex

    pattern = regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)))
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            yield text[pos:m.start()], None
        yield "", specials[m.group(0)]
        pos = m.end()
    if pos < len(text):
        yield text[pos:], None


# ----------------------------------------------------------------------------- SentencePiece


@dataclass(frozen=True, kw_only=True)
class _SPFamily:
    """What a family's reference tokenizer adds around a SentencePiece model (data, one row each).

    Attributes:
      name: family name.
      pieces: the model's piece count (detection); ``probe``: ``{id: piece}`` that must hold too.
      appended: special tokens the reference appends after the pieces, in id order (ChatGLM3).
      aliases: special-token names the reference gives existing pieces (InternLM2's chat
        tokens are pieces ``[UNUSED_TOKEN_*]`` renamed in its tokenizer_config).
      prefix: special tokens ``encode(bos=True)`` prepends (default: the BOS piece).
      bos: the token reported as ``bos_id`` (default: SentencePiece's BOS).
      pad: the padding token (default: SentencePiece's pad piece).
      add_bos: whether the reference prepends ``prefix`` by default.
      classes: HF ``tokenizer_class`` names (``tokenizer_config.json``) of this family.
      source: where these facts come from (documentation).
    """

    name: str
    pieces: int
    probe: Mapping[int, str]
    appended: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    prefix: tuple[str, ...] | None = None
    bos: str | None = None
    pad: str | None = None
    add_bos: bool = True
    classes: tuple[str, ...] = ()
    source: str = ""


_SP_FAMILIES = (
    _SPFamily(name="chatglm3", pieces=64789, probe={1: "<s>", 2: "</s>"},
              appended=("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>",
                        "<|assistant|>", "<|observation|>"),
              prefix=("[gMASK]", "sop"), bos="sop", pad="<unk>", classes=("ChatGLMTokenizer",),
              source="THUDM/chatglm3-6b tokenization_chatglm.py (SPTokenizer, get_prefix_tokens)"),
    _SPFamily(name="baichuan", pieces=64000, probe={3: "<SEP>", 4: "<CLS>"}, pad="<unk>", add_bos=False,
              classes=("BaichuanTokenizer",),
              source="Baichuan-13B-Chat tokenizer_config.json (add_bos_token false, pad <unk>)"),
    _SPFamily(name="baichuan2", pieces=125696, probe={3: "<SEP>", 4: "<CLS>"}, pad="<unk>", add_bos=False,
              classes=("BaichuanTokenizer",),
              source="Baichuan2-13B-Chat tokenizer_config.json (add_bos_token false, pad <unk>)"),
    _SPFamily(name="internlm", pieces=103168, probe={103027: "<eoh>", 103028: "<eoa>"},
              classes=("InternLMTokenizer",),
              source="InternLM tokenization_internlm.py (add_bos_token=True, add_eos_token=False)"),
    _SPFamily(name="internlm2", pieces=92544, probe={92543: "[UNUSED_TOKEN_146]"},
              aliases={"<|plugin|>": "[UNUSED_TOKEN_141]", "<|interpreter|>": "[UNUSED_TOKEN_142]",
                       "<|action_end|>": "[UNUSED_TOKEN_143]", "<|action_start|>": "[UNUSED_TOKEN_144]",
                       "<|im_end|>": "[UNUSED_TOKEN_145]", "<|im_start|>": "[UNUSED_TOKEN_146]"},
              classes=("InternLM2Tokenizer",),
              source="internlm2-chat tokenizer_config.json added_tokens_decoder 92538-92543"),
)
SP_FAMILIES: Mapping[str, _SPFamily] = MappingProxyType({f.name: f for f in _SP_FAMILIES})


def _detect_sp_family(sp, tokenizer_class: str | None) -> _SPFamily | None:
    n = sp.GetPieceSize()

    def fits(f: _SPFamily) -> bool:
        return f.pieces == n and all(i < n and sp.IdToPiece(i) == p for i, p in f.probe.items())

    hits = [f for f in _SP_FAMILIES if fits(f)]
    if tokenizer_class:
        hits = [f for f in hits if tokenizer_class in f.classes] or hits
    return hits[0] if hits else None


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (BPE or unigram), plus what the family's reference tokenizer
    adds around it.

    Special tokens are the CONTROL and USER_DEFINED pieces (e.g. Mistral v3's ``[INST]``=3),
    then the family's: ChatGLM3's tokens after the pieces (``[gMASK]``=64790, ``sop``=64792,
    ``<|user|>``=64795, ...; ``encode(bos=True)`` prepends ``[gMASK] sop``), InternLM2's chat
    names for its ``[UNUSED_TOKEN_*]`` pieces (``<|im_start|>``=92543, ...).

    Args:
        path: the ``.model`` file.
        family: ``"auto"`` (by piece count and probe pieces, see :data:`SP_FAMILIES`, refined by
            ``tokenizer_class``), a name of :data:`SP_FAMILIES`, or ``"generic"`` (the file alone).
        tokenizer_config: the ``tokenizer_config.json`` contents beside the file, if any:
            ``tokenizer_class`` helps detection; ``add_bos_token`` overrides the family default.
    """

    def __init__(self, path: str | Path, *, family: str = "auto", tokenizer_config: Mapping | None = None):
        import sentencepiece as spm

        self.path = str(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except Exception as e:  # sentencepiece raises bare OSError/RuntimeError
            raise ValueError(f"{self.path}: not a valid SentencePiece model ({e})") from None
        cfg = dict(tokenizer_config or {})
        n = self._sp.GetPieceSize()
        if family == "auto":
            fam = _detect_sp_family(self._sp, cfg.get("tokenizer_class"))
        elif family == "generic":
            fam = None
        elif family in SP_FAMILIES:
            fam = SP_FAMILIES[family]
            if fam.pieces != n or any(i >= n or self._sp.IdToPiece(i) != p for i, p in fam.probe.items()):
                raise ValueError(f"{self.path}: not a {family} SentencePiece model (expected {fam.pieces} pieces "
                                 f"with {dict(fam.probe)}, found {n} pieces)")
        else:
            raise ValueError(f"{self.path}: unknown SentencePiece family {family!r}; expected auto, generic or "
                             f"one of {sorted(SP_FAMILIES)}")
        self.family = fam.name if fam else "generic"
        self.bos_id = _none_if_neg(self._sp.bos_id())
        self.eos_id = _none_if_neg(self._sp.eos_id())
        self.pad_id = _none_if_neg(self._sp.pad_id())
        specials = {}
        user_defined = _sentencepiece_user_defined(Path(self.path))
        for i in range(n):
            if self._sp.IsControl(i) or i in user_defined:
                specials[self._sp.IdToPiece(i)] = i
        # ids decoded as their special-token string rather than by SentencePiece
        self._special_text: dict[int, str] = {}
        if fam is not None:
            for k, name in enumerate(fam.appended):
                specials[name] = n + k
                self._special_text[n + k] = name
            for name, piece in fam.aliases.items():
                specials[name] = self._sp.PieceToId(piece)
                self._special_text[specials[name]] = name
            if fam.prefix is not None:
                self._bos_ids = tuple(specials[t] for t in fam.prefix)
            if fam.bos is not None:
                self.bos_id = specials.get(fam.bos, self._sp.PieceToId(fam.bos))
            if fam.pad is not None:
                self.pad_id = self._sp.PieceToId(fam.pad)
            self._add_bos = fam.add_bos
        if isinstance(cfg.get("add_bos_token"), bool):
            self._add_bos = cfg["add_bos_token"]
        self.vocab_size = n + (len(fam.appended) if fam else 0)
        self.special_tokens = specials
        pieces = self._sp.EncodeAsPieces("a")
        self.add_dummy_prefix = bool(pieces) and pieces[0].startswith("\u2581")
        # Continuation trick (as transformers' non-legacy Llama tokenizer): encode a fixed
        # marker before the text and drop the marker's tokens, so no dummy prefix is added.
        self._marker = "\n"
        self._marker_len = len(self._sp.EncodeAsIds(self._marker))

    def _encode_text(self, text: str, first: bool) -> list[int]:
        if first or not self.add_dummy_prefix:
            return list(self._sp.EncodeAsIds(text))
        ids = self._sp.EncodeAsIds(self._marker + text)
        return list(ids[self._marker_len:])

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list[list[int]]:
        """Encode many texts at once (``SentencePieceProcessor.Encode`` on the list)."""
        return self._sp.Encode(list(texts), num_threads=max(int(num_threads), 1))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if not self._special_text:
            return self._sp.DecodeIds(ids)
        # The family's own special tokens are written out; the runs between them are decoded
        # by SentencePiece (as ChatGLM3's SPTokenizer.decode does).
        out, run = [], []
        for i in ids:
            s = self._special_text.get(i)
            if s is None:
                run.append(i)
                continue
            if run:
                out.append(self._sp.DecodeIds(run))
                run = []
            out.append(s)
        if run:
            out.append(self._sp.DecodeIds(run))
        return "".join(out)

    def piece(self, i: int) -> str:
        """The piece string of id ``i`` (the special-token name for a family's own specials)."""
        i = int(i)
        return self._special_text.get(i) or self._sp.IdToPiece(i)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _sentencepiece_user_defined(path: Path) -> set[int]:
    """Ids of USER_DEFINED pieces, read from the ModelProto wire format.

    The sentencepiece Python API has no ``IsUserDefined``; parsing the few fields we need
    (ModelProto.pieces = 1; SentencePiece.type = 3, USER_DEFINED = 4) avoids a protobuf
    dependency.
    """
    buf = path.read_bytes()
    pos, index, out = 0, 0, set()
    try:
        while pos < len(buf):
            key, pos = _read_varint(buf, pos)
            field_no, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _read_varint(buf, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _read_varint(buf, pos)
                if field_no == 1:
                    sub, end = pos, pos + length
                    while sub < end:
                        k, sub = _read_varint(buf, sub)
                        f, w = k >> 3, k & 7
                        if w == 0:
                            v, sub = _read_varint(buf, sub)
                            if f == 3 and v == 4:
                                out.add(index)
                        elif w == 2:
                            ln, sub = _read_varint(buf, sub)
                            sub += ln
                        elif w == 5:
                            sub += 4
                        elif w == 1:
                            sub += 8
                        else:
                            break
                    index += 1
                pos += length
            else:
                break
    except IndexError:
        pass
    return out


def _none_if_neg(i: int) -> int | None:
    return None if i is None or i < 0 else int(i)


# ----------------------------------------------------------------------------- BPE over ranks


def llama3_special_tokens(num_base: int = 128000) -> dict[str, int]:
    """Llama-3's 256 special tokens (llama-models ``tokenizer.py``), after the base ranks."""
    names = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
        "<|python_tag|>", "<|image|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(names))]
    return {n: num_base + i for i, n in enumerate(names)}


def qwen_special_tokens(num_base: int = 151643) -> dict[str, int]:
    """Qwen (v1) special tokens (``tokenization_qwen.py``): endoftext, im_start, im_end, extras."""
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    return {n: num_base + i for i, n in enumerate(names)}


@dataclass(frozen=True, kw_only=True)
class _BPESpec:
    family: str
    pattern: str
    special_tokens: dict[str, int]
    bos: str | None
    eos: str | None
    pad: str | None
    nfc: bool


def _bpe_spec(path: Path, num_ranks: int, family: str) -> _BPESpec:
    if family == "auto":
        if path.suffix == ".tiktoken" or num_ranks == 151643:
            family = "qwen"
        elif num_ranks == 128000:
            family = "llama3"
        else:
            family = "generic"
    if family == "llama3":
        return _BPESpec(family="llama3", pattern=LLAMA3_PATTERN, special_tokens=llama3_special_tokens(num_ranks),
                        bos="<|begin_of_text|>", eos="<|end_of_text|>",
                        pad="<|finetune_right_pad_id|>", nfc=False)
    if family == "qwen":
        return _BPESpec(family="qwen", pattern=QWEN_PATTERN, special_tokens=qwen_special_tokens(num_ranks),
                        bos=None, eos="<|endoftext|>", pad="<|endoftext|>", nfc=True)
    if family == "generic":
        return _BPESpec(family="generic", pattern=LLAMA3_PATTERN, special_tokens={}, bos=None, eos=None, pad=None,
                        nfc=False)
    raise ValueError(f"{path}: unknown rank-file family {family!r}; expected auto, llama3, qwen or generic")


class BPERankTokenizer(Tokenizer):
    """Byte-level BPE over a tiktoken rank file, run by ``tiktoken``.

    The file is parsed here (``base64(token) rank`` per line, errors name the line) and handed to
    ``tiktoken.Encoding`` with the family's pre-tokenisation regex and special tokens; plain text
    goes through ``encode_ordinary`` (special-token strings stay text), so ids equal the
    reference implementations (Meta's llama-models and Qwen's ``tokenization_qwen.py`` are
    tiktoken too). Qwen's NFC normalisation is applied before encoding, as its reference does.

    Args:
        path: the rank file (``base64(token_bytes) rank`` per line).
        family: ``"auto"`` (by file name / size), ``"llama3"``, ``"qwen"`` or ``"generic"``.
        pattern: override the pre-tokenisation regex.
        special_tokens: override the special tokens (string -> id).
    """

    def __init__(self, path: str | Path, *, family: str = "auto", pattern: str | None = None,
                 special_tokens: Mapping[str, int] | None = None):
        try:
            import tiktoken
        except ImportError:
            raise ImportError(f"loading the rank file {path} needs the 'tiktoken' package: "
                              "pip install tiktoken") from None

        path = Path(path)
        self.path = str(path)
        ranks: dict[bytes, int] = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(
                        f"{path}:{lineno}: expected 'base64(token) rank', got {line[:60]!r}") from None
        spec = _bpe_spec(path, len(ranks), family)
        self.family = spec.family
        self.special_tokens = dict(special_tokens if special_tokens is not None else spec.special_tokens)
        self._nfc = spec.nfc
        self._enc = tiktoken.Encoding(name=f"pmodel:{path}", pat_str=pattern or spec.pattern,
                                      mergeable_ranks=ranks, special_tokens=dict(self.special_tokens))
        self.vocab_size = max([len(ranks) - 1, *self.special_tokens.values(), *ranks.values()]) + 1
        self.bos_id = self.special_tokens.get(spec.bos) if spec.bos else None
        self.eos_id = self.special_tokens.get(spec.eos) if spec.eos else None
        self.pad_id = self.special_tokens.get(spec.pad) if spec.pad else None

    def _encode_text(self, text: str, first: bool) -> list[int]:
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list[list[int]]:
        """Encode many texts at once (``tiktoken``'s ``encode_ordinary_batch``; no specials)."""
        texts = list(texts)
        if self._nfc:
            texts = [unicodedata.normalize("NFC", t) for t in texts]
        if num_threads <= 1:  # the batch API's thread pool only adds overhead on one thread
            enc = self._enc.encode_ordinary
            return [enc(t) for t in texts]
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self._enc.decode_bytes([int(i) for i in ids]).decode("utf-8", errors="replace")
        except KeyError:
            bad = next(int(i) for i in ids if not _decodes(self._enc, int(i)))
            raise ValueError(f"{self.path}: id {bad} is not in the vocabulary") from None


def _decodes(enc, i: int) -> bool:
    try:
        enc.decode_single_token_bytes(i)
        return True
    except KeyError:
        return False


# ----------------------------------------------------------------------------- Hugging Face


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``, or ``vocab.json`` +
    ``merges.txt`` as GPT-2 byte-level BPE).

    BOS/EOS/PAD come from ``tokenizer_config.json`` / ``special_tokens_map.json`` beside the
    files when present (a declared token that is not in the vocabulary gives ``None``), and
    fall back to ``<|endoftext|>`` for EOS when the vocabulary has it.

    Args:
        path: a ``tokenizer.json`` file, a ``vocab.json`` file, or a folder holding either.
    """

    def __init__(self, path: str | Path):
        try:
            import tokenizers
        except ImportError:
            raise ImportError(
                f"loading {path} needs the 'tokenizers' package: pip install tokenizers") from None
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        tj = folder / "tokenizer.json" if path.is_dir() else path
        if tj.name == "tokenizer.json" and tj.exists():
            self.path = str(tj)
            self._tok = tokenizers.Tokenizer.from_file(str(tj))
        else:
            vocab, merges = folder / "vocab.json", folder / "merges.txt"
            if not (vocab.exists() and merges.exists()):
                raise FileNotFoundError(f"{path}: expected tokenizer.json or vocab.json + merges.txt")
            self.path = str(vocab)
            from tokenizers import decoders, models, pre_tokenizers

            # tokenizers skips a first line only when it starts with '#version' (GPT-2 copies
            # without the header keep their first merge).
            bpe = models.BPE.from_file(str(vocab), str(merges))
            tok = tokenizers.Tokenizer(bpe)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            tok.decoder = decoders.ByteLevel()
            self._tok = tok
        self.family = "hf"
        vocab_map = self._tok.get_vocab(with_added_tokens=True)
        added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        cfg = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = folder / name
            if p.exists():
                try:
                    data = json.loads(p.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{p}: invalid JSON ({e})") from None
                for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
                    v = data.get(k)
                    if isinstance(v, dict):
                        v = v.get("content")
                    if isinstance(v, str) and k not in cfg:
                        cfg[k] = v
        specials = dict(added)
        for k, v in cfg.items():
            if v in vocab_map:
                specials[v] = vocab_map[v]
        if "<|endoftext|>" in vocab_map:
            specials.setdefault("<|endoftext|>", vocab_map["<|endoftext|>"])
        self.special_tokens = specials
        self.bos_id = vocab_map.get(cfg["bos_token"]) if "bos_token" in cfg else None
        if "eos_token" in cfg:
            self.eos_id = vocab_map.get(cfg["eos_token"])
        else:
            self.eos_id = vocab_map.get("<|endoftext|>")
        self.pad_id = vocab_map.get(cfg["pad_token"]) if "pad_token" in cfg else None
        self.vocab_size = max(vocab_map.values()) + 1
        # Whether transformers' tokenizer(text) prepends BOS: tokenizer_config's add_bos_token,
        # else what tokenizer.json's post-processor adds (GPT-2 style vocab/merges: never).
        add_bos = _tokenizer_config(folder).get("add_bos_token")
        if isinstance(add_bos, bool):
            self._add_bos = add_bos and self.bos_id is not None
        elif self.bos_id is not None and self.path.endswith("tokenizer.json"):
            probe = self._tok.encode("a", add_special_tokens=True).ids
            self._add_bos = bool(probe) and probe[0] == self.bos_id
        else:
            self._add_bos = False

    def _encode_text(self, text: str, first: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list[list[int]]:
        """Encode many texts at once (``tokenizers``' ``encode_batch_fast``; no specials parsed
        unless the tokenizer.json marks them so).

        ``tokenizers`` sizes its own thread pool from ``TOKENIZERS_PARALLELISM`` /
        ``RAYON_NUM_THREADS`` (read by the library, not here; ``num_threads`` cannot change it):
        ``scripts/preprocess_data.py`` sets ``TOKENIZERS_PARALLELISM=false`` for its worker
        processes so that each uses one core.
        """
        texts = list(texts)
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


# ----------------------------------------------------------------------------- bytes


class ByteTokenizer(Tokenizer):
    """Bytes are ids 0..255; special tokens follow (``<s>``, ``</s>``, ``<pad>`` by default).

    Args:
        specials: extra special-token strings, appended after the defaults.
    """

    def __init__(self, specials: Sequence[str] = ()):
        names = ["<s>", "</s>", "<pad>", *[s for s in specials if s not in ("<s>", "</s>", "<pad>")]]
        self.special_tokens = {s: 256 + i for i, s in enumerate(names)}
        self._inv = {i: s for s, i in self.special_tokens.items()}
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self.vocab_size = 256 + len(names)
        self.path = "<bytes>"
        self.family = "bytes"
        self._add_bos = False  # no reference tokenizer: nothing is added by default

    def _encode_text(self, text: str, first: bool) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(self._inv[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


# ----------------------------------------------------------------------------- loading


_KINDS = ("auto", "sentencepiece", "tiktoken", "hf", "bytes")


def load_tokenizer(path: str | Path | None, *, kind: str = "auto", family: str = "auto",
                   vocab_size: int | None = None, use_fast: bool = True) -> Tokenizer:
    """Load a tokenizer from a file or a model folder.

    Detection (``kind="auto"``): a folder is searched for ``tokenizer.json``,
    ``tokenizer.model``, ``*.tiktoken``, ``vocab.json`` + ``merges.txt``, then ``*.model``. A
    ``.model`` file is SentencePiece when it parses as one, else a rank file; ``.tiktoken`` is
    a rank file; ``.json`` is Hugging Face.

    The family (what the reference tokenizer adds around the file: special tokens, prefix,
    whether it adds BOS) is detected too: rank files by name / size (Llama-3, Qwen),
    SentencePiece models by piece count and probe pieces (:data:`SP_FAMILIES`: ChatGLM3,
    Baichuan, Baichuan2, InternLM, InternLM2), refined by ``tokenizer_class`` of a
    ``tokenizer_config.json`` beside the file, whose ``add_bos_token`` also sets
    :attr:`Tokenizer.add_bos`. Anything else loads as ``generic`` (the file alone).

    Args:
        path: file or folder (``None`` or ``"bytes"`` with ``kind="bytes"`` gives a ByteTokenizer).
        kind: ``auto``, ``sentencepiece``, ``tiktoken``, ``hf`` or ``bytes``.
        family: ``auto``, ``generic``, for rank files ``llama3`` or ``qwen``, for SentencePiece
            models a name of :data:`SP_FAMILIES`.
        vocab_size: the model's vocabulary size; if given, checked with
            :func:`check_vocab_size` (clear error on mismatch).
        use_fast: in a folder, prefer ``tokenizer.json`` (Hugging Face's "fast" tokenizer, the
            default) or, with ``False``, the model's own file (``tokenizer.model``,
            ``*.tiktoken``, ``vocab.json`` + ``merges.txt``: what HF's slow tokenizer reads);
            ``False`` with only a ``tokenizer.json`` raises.

    Returns:
        A :class:`Tokenizer`.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {_KINDS}")
    if kind == "bytes" or (path is None and kind == "auto") or str(path) == "bytes":
        tok: Tokenizer = ByteTokenizer()
    else:
        if path is None:
            raise ValueError(f"tokenizer kind {kind!r} needs a path")
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer path {p} does not exist")
        if not use_fast and kind in ("auto", "hf"):
            p = _slow_file(p)
        tok = _load_path(p, kind, family)
    if vocab_size is not None:
        check_vocab_size(tok, vocab_size)
    return tok


def _slow_file(p: Path) -> Path:
    """The file HF's slow tokenizer reads in ``p`` (a folder or file), refusing ``tokenizer.json``."""
    if p.is_dir():
        for c in [p / "tokenizer.model", *sorted(p.glob("*.tiktoken")), *sorted(p.glob("*.model"))]:
            if c.exists():
                return c
        if (p / "vocab.json").exists() and (p / "merges.txt").exists():
            return p / "vocab.json"
        raise FileNotFoundError(f"{p}: no slow-tokenizer file (tokenizer.model, *.tiktoken, *.model, vocab.json + "
                                "merges.txt) for use_fast=False; only a fast tokenizer.json is there")
    if p.name == "tokenizer.json":
        raise ValueError(f"{p}: use_fast=False asks for the slow tokenizer, but tokenizer.json is the fast one; "
                         "give the folder or the model's own file")
    return p


def _load_path(p: Path, kind: str, family: str) -> Tokenizer:
    if p.is_dir():
        if kind in ("auto", "hf") and ((p / "tokenizer.json").exists()
                                       or ((p / "vocab.json").exists() and (p / "merges.txt").exists())):
            return HFTokenizer(p)
        candidates = [p / "tokenizer.model", *sorted(p.glob("*.tiktoken")), *sorted(p.glob("*.model"))]
        for c in candidates:
            if c.exists():
                return _load_path(c, kind, family)
        raise FileNotFoundError(
            f"{p}: no tokenizer.json, tokenizer.model, *.tiktoken, vocab.json+merges.txt or *.model found")
    if kind == "hf" or (kind == "auto" and p.suffix == ".json"):
        return HFTokenizer(p)
    if kind == "tiktoken":
        return BPERankTokenizer(p, family=family)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(p, family=family, tokenizer_config=_tokenizer_config(p.parent))
    # auto: sniff. A rank file is ASCII lines of "base64 int"; a SentencePiece model is protobuf.
    with open(p, "rb") as f:
        head = f.read(256)
    first = head.split(b"\n", 1)[0].split()
    if len(first) == 2 and first[1].isdigit():
        return BPERankTokenizer(p, family=family)
    return SentencePieceTokenizer(p, family=family, tokenizer_config=_tokenizer_config(p.parent))


def _tokenizer_config(folder: Path) -> dict:
    """``tokenizer_config.json`` in ``folder`` ({} when absent)."""
    f = folder / "tokenizer_config.json"
    if not f.exists():
        return {}
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def check_vocab_size(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise if the tokenizer can produce ids the model's embedding does not have.

    A model vocabulary larger than the tokenizer's is fine (padded embeddings, e.g. Qwen's
    151936 for 151851 ids); a smaller one is an error.

    Args:
        tokenizer: the tokenizer.
        model_vocab_size: the model's (possibly padded) vocabulary size.
    """
    if model_vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: tokenizer {tokenizer.path} produces ids up to "
            f"{tokenizer.vocab_size - 1} (vocab_size {tokenizer.vocab_size}) but the model's "
            f"vocab_size is {model_vocab_size}; use the tokenizer that matches the checkpoint")

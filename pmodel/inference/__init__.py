"""Inference: KV-cached decoding, sampling, beam search, streaming text, chat and serving.

* :mod:`~pmodel.inference.sampling` — :class:`SamplingConfig`: greedy, temperature, top-k, top-p,
  min-p, repetition / presence / frequency penalties, seeded.
* :mod:`~pmodel.inference.decode` — :class:`Decoder`: prefill + per-token step over a KV cache
  (a prepared fast step for the plain decoder; the model's own forward for wrapped or sharded
  weights: LoRA unmerged, tensor parallel).
* :mod:`~pmodel.inference.engine` — :class:`GenerationConfig`, :class:`TokenGenerator`,
  :func:`generate_ids`, :func:`stream` (text deltas) and :func:`complete` (whole texts).
* :mod:`~pmodel.inference.beam` — :func:`beam_search` (Hugging Face's algorithm).
* :mod:`~pmodel.inference.text` — :class:`Detokenizer` (never splits a character),
  :class:`StopMatcher`.
* :mod:`~pmodel.inference.chat` — :class:`ChatSession`: history on a family's chat template,
  truncated from the oldest turn.
* :mod:`~pmodel.inference.server` — :func:`create_app`: an OpenAI-compatible FastAPI app
  (FastAPI is imported only when an app is built).

``pmodel.generate`` (in :mod:`pmodel.generation`) is the one-call entry point over these.
"""
from .beam import beam_search
from .chat import ChatSession
from .decode import Decoder
from .engine import Completion, Delta, GenerationConfig, TokenGenerator, complete, generate_ids, left_pad, stream
from .sampling import SamplingConfig, process_logits, sample_next, select
from .text import Detokenizer, StopMatcher

__all__ = ["GenerationConfig", "SamplingConfig", "Decoder", "TokenGenerator", "generate_ids", "beam_search",
           "stream", "complete", "Completion", "Delta", "left_pad", "Detokenizer", "StopMatcher", "ChatSession",
           "process_logits", "select", "sample_next"]

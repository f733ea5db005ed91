"""pmodel as an lm-evaluation-harness backend (optional extra: ``pip install lm-eval``).

Importing this module registers the model type ``pmodel`` with lm-eval. lm-eval's own command
line does not discover third-party models, so run it through this module, which registers the
backend and hands the arguments to lm-eval's CLI unchanged::

    python -m pmodel.evaluation.harness --model pmodel --model_args pretrained=HF_DIR,dtype=float32 \\
        --tasks mmlu --batch_size 8

or from Python: ``lm_eval.simple_evaluate(model=PModelLM(pretrained=...), tasks=[...])``.

Conventions follow lm-eval's ``hf`` backend so the two give the same numbers: requests are
tokenised as ``HFLM`` does (``_encode_pair`` moves trailing context spaces to the continuation;
BOS is added where the tokenizer adds it, i.e. ``add_bos_token`` defaults to "the tokenizer has a
BOS"), an empty context is replaced by the prefix token (BOS, else EOS), contexts are cut from the
left to ``max_length``, and ``loglikelihood_rolling`` uses lm-eval's own rolling windows.
"""
from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

import pmodel

from .scoring import LoglikelihoodRequest, generate_until, loglikelihood

__all__ = ["PModelLM", "main"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "auto": None}


@register_model("pmodel")
class PModelLM(TemplateLM):
    """An lm-eval ``LM`` running a pmodel model.

    Args (``--model_args`` keys):
      pretrained: HF checkpoint folder (any family pmodel loads).
      tokenizer: tokenizer path (default: ``pretrained``).
      lora: a PEFT adapter folder applied on top.
      dtype: ``float32`` (default), ``float64``, ``bfloat16``, ``float16``.
      device: ``cpu`` (default), ``cuda``, ``npu``.
      batch_size: requests per forward.
      max_length: the window (default: the model's ``max_position_embeddings``).
      max_gen_toks: default generation length (256, as HFLM).
      add_bos_token: prepend BOS (default: when the tokenizer has one, as HF Llama tokenizers do).
    """

    def __init__(self, pretrained: str, tokenizer: str | None = None, lora: str | None = None, dtype: str = "float32",
                 device: str = "cpu", batch_size: int | str = 1, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, max_batch_size: int | None = None,
                 **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"pmodel backend: unknown model_args {sorted(kwargs)}")
        if dtype not in _DTYPES or _DTYPES[dtype] is None:
            raise ValueError(f"pmodel backend: dtype {dtype!r}; choose float32, float64, bfloat16 or float16")
        self.model, params = pmodel.load_hf(pretrained, dtype=_DTYPES[dtype])
        if lora:
            from ..checkpoint import peft as peft_io
            self.model, params = peft_io.load_adapter(self.model, params, lora)
        dev = torch.device(device)
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if dev.type == "cuda" and (acc is None or acc.type != "cuda"):
            # lm-eval's CLI passes --device cuda by default; its hf backend falls back the same way.
            import warnings
            warnings.warn("pmodel backend: CUDA is not available; running on CPU")
            dev = torch.device("cpu")
        self._device = dev
        self.params = pmodel.tree.map(lambda t: t.to(self._device), params)
        self.tok = pmodel.data.load_tokenizer(tokenizer or pretrained)
        # "auto" (lm-eval's batch-size search) is not implemented: a fixed size, at most max_batch_size.
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else int(max_batch_size or 1)
        self._max_length = int(max_length) if max_length is not None else self.model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        if isinstance(add_bos_token, str):
            add_bos_token = add_bos_token.lower() == "true"
        self.add_bos = (self.tok.bos_id is not None) if add_bos_token is None else bool(add_bos_token)

    # ------------------------------------------------------------------ TemplateLM hooks
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else bool(add_special_tokens)
        return self.tok.encode(string, bos=bos and self.tok.bos_id is not None)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm
        out = [None] * len(requests)
        # Group by context so a question's choices share one prefix pass; batch groups.
        groups: dict[tuple, list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        keys = list(groups)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="pmodel loglikelihood")
        for s in range(0, len(keys), self.batch_size):
            chunk = keys[s:s + self.batch_size]
            reqs = [LoglikelihoodRequest(k, tuple(tuple(requests[i][2]) for i in groups[k])) for k in chunk]
            res = loglikelihood(self.model, self.params, reqs, max_len=self.max_length)
            for k, r in zip(chunk, res):
                for i, (ll, greedy) in zip(groups[k], r):
                    out[i] = (ll, greedy)
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], (ll, greedy))
                bar.update(len(groups[k]))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils as lm_utils
        out = []
        for (string,) in [r.args for r in requests]:
            windows = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)))
            res = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(r[0] for r in res)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm
        res = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="pmodel generate_until")
        for s in range(0, len(requests), self.batch_size):
            chunk = requests[s:s + self.batch_size]
            # one call per distinct generation setting (lm-eval batches by gen_kwargs too)
            by_kw: dict[str, list[int]] = {}
            for j, r in enumerate(chunk):
                by_kw.setdefault(repr(sorted(r.args[1].items())), []).append(j)
            texts = [None] * len(chunk)
            for idx in by_kw.values():
                kw = dict(chunk[idx[0]].args[1])
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                eos_text = self.tok_decode([self.eot_token_id]) if self.eot_token_id is not None else None
                if eos_text and eos_text not in until:
                    until.append(eos_text)
                max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
                temp = float(kw.pop("temperature", 0.0))
                do_sample = kw.pop("do_sample", None)
                if do_sample or temp > 0:
                    raise ValueError("pmodel backend: generate_until runs greedy decoding (temperature 0, "
                                     f"do_sample false); got temperature={temp}, do_sample={do_sample}")
                kw.pop("top_p", None), kw.pop("top_k", None)
                if kw:
                    raise ValueError(f"pmodel backend: unsupported generation arguments {sorted(kw)}")
                prompts = [self.tok_encode(chunk[j].args[0])[-(self.max_length - max_gen):] for j in idx]
                gen = generate_until(self.model, self.params, prompts, max_new_tokens=max_gen, decode=self.tok_decode,
                                     stop=until, eos_ids=[self.eot_token_id] if self.eot_token_id is not None else [])
                for j, g in zip(idx, gen):
                    texts[j] = g
                    self.cache_hook.add_partial("generate_until", (chunk[j].args[0], chunk[j].args[1]), g)
            res.extend(texts)
            bar.update(len(chunk))
        bar.close()
        return res


def main(argv=None) -> None:
    """lm-eval's command line with the ``pmodel`` model type registered."""
    import sys

    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    setup_logging()
    parser = HarnessCLI()
    parser.execute(parser.parse_args())


if __name__ == "__main__":
    main()

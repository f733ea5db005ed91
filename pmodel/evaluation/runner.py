"""Evaluate a model on a task's questions: prompts -> scores -> per-subject and overall results.

Data parallel: the questions are cut into batches of ``batch_size`` in file order and batch ``b``
runs on rank ``b % world``, so each batch is computed exactly as in one process and the gathered
results equal a single-process run. Tensor parallel: ``model`` / ``params`` may be a TP model and
this rank's shards (every TP rank of a data-parallel group then runs the same batches with the
same ``rank``; ``rank`` / ``world`` / ``gather`` are the data-parallel ones).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Sequence

from .sandbox import SandboxLimits, run_python
from .scoring import LoglikelihoodRequest, choice_metrics, generate_until, loglikelihood, pass_at_k
from .tasks import Question, Task, get_task, humaneval_program

__all__ = ["EvalConfig", "evaluate", "encode_prompt", "encode_pair", "summarize", "score_samples", "file_sha256"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How to evaluate.

    Attributes:
      scoring: for multiple-choice tasks: ``"loglikelihood"`` (lm-eval: acc and acc_norm over the
        choice continuations) or ``"generate"`` (ModelLink: greedy generation, first answer
        extracted). Generative and code tasks always generate.
      batch_size: questions per forward (``--evaluation-batch-size``).
      max_new_tokens: generation length (default: the task's).
      add_bos: prepend the tokenizer's BOS to prompts without a chat template (when it has one).
      template: a chat template name (``--prompt-type``): the prompt becomes one user turn.
      max_len: the model's window (prompts are cut from the left to fit).
      num_samples: HumanEval completions per problem (``temperature > 0`` when more than one).
      temperature, top_p: sampling for HumanEval's samples.
      seed: sampling seed (row seeds are derived from it and the question / sample index).
      pass_k: the k of pass@k to report.
      sandbox: limits for running generated code.
      allow_unsandboxed: run generated code without namespace isolation where the kernel has none.
      progress: a progress bar on the lead rank.
      run_code: run HumanEval completions in the sandbox. ``False`` on ranks whose records are
        discarded (the tensor-parallel ranks other than the first of each group generate the same
        completions): their code records say ``"not run"`` and score 0, and no program runs twice.
    """

    scoring: str = "generate"
    batch_size: int = 1
    max_new_tokens: int | None = None
    add_bos: bool = True
    template: str | None = None
    max_len: int | None = None
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float | None = None
    seed: int = 0
    pass_k: tuple[int, ...] = (1,)
    sandbox: SandboxLimits = SandboxLimits(timeout_s=10.0)
    allow_unsandboxed: bool = False
    progress: bool = True
    run_code: bool = True

    def __post_init__(self):
        if self.scoring not in ("generate", "loglikelihood"):
            raise ValueError(f"scoring must be 'generate' or 'loglikelihood', got {self.scoring!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature <= 0:
            raise ValueError(f"num_samples={self.num_samples} greedy samples would all be the same completion; "
                             "set temperature > 0")
        for k in self.pass_k:
            if not 1 <= k <= self.num_samples:
                raise ValueError(f"pass@{k} needs 1 <= k <= num_samples ({self.num_samples})")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_prompt(tokenizer, text: str, *, template: str | None = None, add_bos: bool = True) -> list[int]:
    """Token ids of a prompt: one user turn of ``template``, or the plain text (BOS first when the
    tokenizer has one and ``add_bos``)."""
    if template is not None:
        from ..data.templates import Message, render
        return list(render(tokenizer, template, [Message(role="user", content=text)]).ids)
    return tokenizer.encode(text, bos=add_bos and tokenizer.bos_id is not None)


def encode_pair(tokenizer, context: str, continuation: str, *, template: str | None = None,
                add_bos: bool = True) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation; the
    continuation's ids are the whole string's ids after the context's. With a chat template the
    context is the rendered user turn and the continuation is encoded as a continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if template is not None:
        return encode_prompt(tokenizer, context, template=template), tokenizer.encode_continuation(continuation)
    bos = add_bos and tokenizer.bos_id is not None
    whole = tokenizer.encode(context + continuation, bos=bos)
    ctx = tokenizer.encode(context, bos=bos)
    return ctx, whole[len(ctx):]


def _eos_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for s in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        i = tokenizer.special_tokens.get(s) if tokenizer.special_tokens else None
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def _score_text(task: Task, q: Question, text: str) -> dict:
    if task.name == "gsm8k":
        from .tasks import extract_gsm8k_flexible
        pred = task.extract(text, q)
        flex = extract_gsm8k_flexible(text, q)
        return {"prediction": pred, "score": float(pred == q.gold), "flexible_prediction": flex,
                "flexible_score": float(flex == q.gold)}
    pred = task.extract(text, q)
    return {"prediction": pred, "score": float(pred == q.gold)}


def _run_batch(model, params, tokenizer, task: Task, qs: Sequence[Question], cfg: EvalConfig, first_index: int
               ) -> list[dict]:
    recs = []
    if task.kind == "choice" and cfg.scoring == "loglikelihood":
        reqs, enc = [], []
        for q in qs:
            pairs = [encode_pair(tokenizer, q.prompt, c, template=cfg.template, add_bos=cfg.add_bos) for c in q.choices]
            ctx = pairs[0][0]
            if any(p[0] != ctx for p in pairs):
                # Trailing-space moves can give choices different contexts: score them separately.
                reqs.extend(LoglikelihoodRequest(tuple(p[0]), (tuple(p[1]),)) for p in pairs)
                enc.append(len(pairs))
            else:
                reqs.append(LoglikelihoodRequest(tuple(ctx), tuple(tuple(p[1]) for p in pairs)))
                enc.append(0)
        out = loglikelihood(model, params, reqs, max_len=cfg.max_len)
        k = 0
        for q, e in zip(qs, enc):
            if e:
                lls = [out[k + j][0] for j in range(e)]
                k += e
            else:
                lls = out[k]
                k += 1
            m = choice_metrics([x[0] for x in lls], q.choices, q.gold_index)
            recs.append({"prediction": q.choices[m["pred"]].strip(), "prediction_norm": q.choices[m["pred_norm"]].strip(),
                         "score": m["acc"], "acc_norm": m["acc_norm"], "loglikelihoods": [x[0] for x in lls],
                         "is_greedy": [x[1] for x in lls]})
        return recs
    n = cfg.num_samples if task.kind == "code" else 1
    prompts, seeds = [], []
    for j, q in enumerate(qs):
        ids = encode_prompt(tokenizer, q.prompt, template=cfg.template, add_bos=cfg.add_bos)
        for s in range(n):
            prompts.append(ids)
            seeds.append(cfg.seed * 1_000_003 + (first_index + j) * 1009 + s)
    max_new = cfg.max_new_tokens or task.max_new_tokens
    temp = cfg.temperature if task.kind == "code" else 0.0
    texts = generate_until(model, params, prompts, max_new_tokens=max_new, decode=tokenizer.decode, stop=task.stop,
                           eos_ids=_eos_ids(tokenizer), temperature=temp, top_p=cfg.top_p,
                           seeds=seeds if temp > 0 else None, max_len=cfg.max_len)
    for j, q in enumerate(qs):
        gen = texts[j * n:(j + 1) * n]
        if task.kind == "code":
            recs.append(_run_code(q, gen, cfg))
        else:
            r = _score_text(task, q, gen[0])
            r["generated"] = gen[0]
            recs.append(r)
    return recs


def _run_code(q: Question, completions: Sequence[str], cfg: EvalConfig) -> dict:
    results = []
    for c in completions:
        if not cfg.run_code:
            results.append({"completion": c, "status": "not run", "isolated": False, "error": "run_code=False"})
            continue
        r = run_python(humaneval_program(q.data, c), limits=cfg.sandbox, allow_unsandboxed=cfg.allow_unsandboxed)
        results.append({"completion": c, "status": r.status, "isolated": r.isolated,
                        "error": "" if r.passed else (r.stderr.strip().splitlines() or [r.status])[-1][:500]})
    c_pass = sum(r["status"] == "passed" for r in results)
    rec = {"prediction": completions[0], "samples": results, "passed": c_pass, "n": len(results),
           "score": pass_at_k(len(results), c_pass, 1)}
    for k in cfg.pass_k:
        rec[f"pass@{k}"] = pass_at_k(len(results), c_pass, k)
    return rec


def score_samples(questions: Sequence[Question], samples: Sequence[dict], cfg: EvalConfig, *,
                  source: str = "samples") -> list[dict]:
    """Score completions made elsewhere (human-eval's ``evaluate_functional_correctness``): ``samples``
    are ``{"task_id", "completion"}`` records; every problem needs the same number of samples.

    Returns:
      One record per problem that has samples (as :func:`evaluate`'s records).
    """
    by_id = {q.data["task_id"]: q for q in questions}
    grouped: dict[str, list[str]] = {}
    for i, s in enumerate(samples):
        if not isinstance(s, dict) or not isinstance(s.get("task_id"), str) or not isinstance(s.get("completion"), str):
            raise ValueError(f"{source}: record {i + 1} needs string 'task_id' and 'completion'")
        if s["task_id"] not in by_id:
            raise ValueError(f"{source}: record {i + 1}: task_id {s['task_id']!r} is not in the problem file")
        grouped.setdefault(s["task_id"], []).append(s["completion"])
    if not grouped:
        raise ValueError(f"{source}: no samples")
    ns = {len(v) for v in grouped.values()}
    if any(k > min(ns) for k in cfg.pass_k):
        raise ValueError(f"{source}: pass@{max(cfg.pass_k)} needs that many samples per problem; the fewest is {min(ns)}")
    recs = []
    for q in questions:
        if q.data["task_id"] in grouped:
            r = _run_code(q, grouped[q.data["task_id"]], cfg)
            recs.append(_record(q, q.prompt, r))
    return recs


def _record(q: Question, prompt_sent: str, r: dict) -> dict:
    return {"id": q.id, "subject": q.subject, "index": q.index, "source": q.source,
            "question": q.data.get("question", q.data.get("task_id", "")), "prompt": prompt_sent, "gold": q.gold, **r}


def summarize(task: Task, records: Sequence[dict], cfg: EvalConfig) -> dict:
    """Per-subject and overall scores: ``micro`` (over questions) and ``macro`` (mean of subjects)."""
    keys = ["score"]
    if task.kind == "choice" and cfg.scoring == "loglikelihood":
        keys.append("acc_norm")
    if task.name == "gsm8k":
        keys.append("flexible_score")
    if task.kind == "code":
        keys = [f"pass@{k}" for k in cfg.pass_k]
    subjects: dict[str, dict] = {}
    for r in records:
        s = subjects.setdefault(r["subject"], {"n": 0, **{k: 0.0 for k in keys}})
        s["n"] += 1
        for k in keys:
            s[k] += r[k]
    for s in subjects.values():
        for k in keys:
            s[k] /= s["n"]
    n = len(records)
    overall = {"n": n}
    for k in keys:
        overall[f"{k}_micro"] = sum(r[k] for r in records) / n if n else float("nan")
        overall[f"{k}_macro"] = sum(s[k] for s in subjects.values()) / len(subjects) if subjects else float("nan")
    metric = {"choice": "acc" if cfg.scoring == "loglikelihood" else "accuracy (generated answer)",
              "generate": "exact match", "code": "pass@k"}[task.kind]
    return {"metric": metric, "subjects": subjects, "overall": overall}


def evaluate(model, params, tokenizer, task: str | Task, questions: Sequence[Question], cfg: EvalConfig, *,
             rank: int = 0, world: int = 1, gather: Callable[[list], list] | None = None) -> dict:
    """Evaluate ``questions`` of ``task``.

    Args:
      model, params: the model: plain params on one device, or a tensor-parallel model
        (:func:`pmodel.parallel.tensor.tensor_parallel`) and this rank's ``shard_params``; then every
        rank of the TP group calls with the same arguments.
      tokenizer: a :class:`pmodel.data.Tokenizer`.
      task: the :class:`Task` or its name.
      questions: from :func:`pmodel.evaluation.load_questions`.
      cfg: the :class:`EvalConfig`.
      rank, world: this process among the data-parallel ranks (its TP group's data-parallel
        index under tensor parallelism).
      gather: ``local_list -> list of every data-parallel rank's lists`` (e.g. ``all_gather_object``
        over the data-parallel group); required when ``world > 1``.

    Returns:
      ``{"records": [...], "summary": {...}}`` on the lead rank (records in question order: the
      question, the prompt as sent, the prediction, the gold answer and the score); other ranks get
      ``{"records": None, "summary": None}``.
    """
    t = get_task(task) if isinstance(task, str) else task
    if t.kind == "choice" and cfg.scoring == "loglikelihood" and cfg.max_new_tokens is not None:
        raise ValueError("max_new_tokens applies to generation; log-likelihood scoring generates nothing")
    if world > 1 and gather is None:
        raise ValueError("world > 1 needs a gather function")
    bs = cfg.batch_size
    batches = [list(range(i, min(i + bs, len(questions)))) for i in range(0, len(questions), bs)]
    mine = [b for k, b in enumerate(batches) if k % world == rank]
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(questions), desc=f"{t.name} (rank 0 of {world})" if world > 1 else t.name, unit="q")
    local = []
    try:
        for b in mine:
            qs = [questions[i] for i in b]
            recs = _run_batch(model, params, tokenizer, t, qs, cfg, b[0])
            for i, q, r in zip(b, qs, recs):
                local.append((i, _record(q, _prompt_as_sent(tokenizer, q.prompt, cfg), r)))
            if bar is not None:
                bar.update(len(b) * world if world > 1 else len(b))
    finally:
        if bar is not None:
            bar.close()
    if world > 1:
        parts = gather(local)
        if rank != 0:
            return {"records": None, "summary": None}
        local = [x for p in parts for x in p]
    records = [r for _, r in sorted(local, key=lambda x: x[0])]
    return {"records": records, "summary": summarize(t, records, cfg)}


def _prompt_as_sent(tokenizer, text: str, cfg: EvalConfig) -> str:
    if cfg.template is None:
        return text
    return tokenizer.decode(encode_prompt(tokenizer, text, template=cfg.template))

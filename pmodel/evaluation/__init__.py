"""Benchmark evaluation: MMLU, C-Eval, BoolQ, GSM8K, HumanEval (sandboxed), BBH, AGIEval.

Task readers take the files as distributed (:mod:`.tasks`); scoring is log-likelihood of choice
continuations (lm-eval's ``acc`` / ``acc_norm``) or greedy generation with answer extraction
(:mod:`.scoring`); generated code runs only in a separate confined process (:mod:`.sandbox`);
:func:`evaluate` runs a task, data-parallel across ranks if asked. ``pmodel.evaluation.lm_eval``
makes pmodel an lm-evaluation-harness backend (optional extra ``lm-eval``). See
``docs/evaluation.md``.
"""
from .runner import EvalConfig, encode_pair, encode_prompt, evaluate, file_sha256, score_samples, summarize
from .sandbox import SandboxLimits, SandboxResult, SandboxUnavailable, run_python, sandbox_available
from .scoring import (LoglikelihoodRequest, choice_metrics, generate_until, loglikelihood, loglikelihood_naive,
                      loglikelihood_rolling, pass_at_k)
from .tasks import (TASKS, Question, Task, TaskDataError, extract_agieval, extract_bbh, extract_choice_letter,
                    extract_gsm8k, extract_gsm8k_flexible, get_task, gsm8k_gold, humaneval_program, load_questions,
                    normalize_number)

__all__ = [
    "EvalConfig", "evaluate", "encode_prompt", "encode_pair", "summarize", "score_samples", "file_sha256",
    "SandboxLimits", "SandboxResult", "SandboxUnavailable", "run_python", "sandbox_available",
    "LoglikelihoodRequest", "loglikelihood", "loglikelihood_naive", "loglikelihood_rolling", "generate_until",
    "choice_metrics", "pass_at_k",
    "TASKS", "Task", "Question", "TaskDataError", "get_task", "load_questions", "extract_gsm8k",
    "extract_gsm8k_flexible", "gsm8k_gold", "extract_bbh", "extract_choice_letter", "extract_agieval",
    "normalize_number", "humaneval_program",
]

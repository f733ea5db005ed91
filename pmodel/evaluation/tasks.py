"""Benchmark tasks: readers of the official file formats, prompts, answer extraction.

One reader per benchmark turns the files as distributed into :class:`Question` records (the
prompt as it will be sent, the log-likelihood choices, the gold answer, the file and line it came
from). Prompt formats, shot counts and extraction follow the sources named in each function's
docstring and in ``docs/evaluation.md``. A malformed record raises :class:`TaskDataError`
naming the file and line; nothing is skipped silently.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import json
import re
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["Question", "Task", "TaskDataError", "TASKS", "get_task", "load_questions",
           "extract_gsm8k", "extract_gsm8k_flexible", "gsm8k_gold", "extract_bbh", "extract_choice_letter",
           "extract_agieval", "normalize_number", "humaneval_program"]

LETTERS = "ABCDEFG"


class TaskDataError(ValueError):
    """A benchmark file that does not have the expected format (names the file and line)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Question:
    """One evaluation item.

    Attributes:
      task: the task name.
      subject: subject / sub-task (MMLU subject, BBH task, AGIEval dataset) or the task name.
      index: position within the subject file (0-based).
      prompt: the text sent to the model (few-shot examples included), before any chat template.
      choices: log-likelihood continuations (e.g. ``(" A", " B", " C", " D")``); None for tasks
        that are only generative.
      gold: the gold answer as text (a letter, "yes"/"no", a number, a BBH target).
      gold_index: index of the gold continuation in ``choices`` (None without choices).
      source: ``file:line`` of the record.
      data: the raw record (e.g. the HumanEval problem).
    """

    task: str
    subject: str
    index: int
    prompt: str
    choices: tuple[str, ...] | None
    gold: str
    gold_index: int | None
    source: str
    data: dict = dataclasses.field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.subject}/{self.index}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """A benchmark: how to read it and how to score generated text.

    Attributes:
      name: the ``--task`` name.
      kind: ``"choice"`` (log-likelihood or generated letter), ``"generate"`` (free text,
        extracted answer, exact match) or ``"code"`` (HumanEval: run in the sandbox).
      load: ``(path, shots) -> list[Question]``.
      shots: the default few-shot count (the source's).
      stop: stop strings for generation.
      max_new_tokens: default generation length.
      extract: ``(generated_text, question) -> answer`` for generative scoring.
      language: ``"en"`` / ``"zh"`` (informational).
    """

    name: str
    kind: str
    load: Callable[[Path, int], list]
    shots: int
    stop: tuple[str, ...]
    max_new_tokens: int
    extract: Callable[[str, Question], str]
    language: str = "en"


# ----------------------------------------------------------------------------- file helpers
def _err(path, line, msg) -> TaskDataError:
    return TaskDataError(f"{path}:{line}: {msg}")


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise _err(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise _err(path, n, f"expected a JSON object, got {type(rec).__name__}")
            out.append((n, rec))
    return out


def _require(path, n, rec: dict, fields: dict) -> None:
    for k, types in fields.items():
        if k not in rec:
            raise _err(path, n, f"missing field {k!r} (fields present: {sorted(rec)})")
        if not isinstance(rec[k], types):
            want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
            raise _err(path, n, f"field {k!r} should be {want}, got {type(rec[k]).__name__}")


def _files(path: Path, pattern: str, what: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    files = sorted(path.glob(pattern))
    if not files:
        raise FileNotFoundError(f"{what}: no {pattern} files in {path}")
    return files


def _split_dir(path: Path, split: str) -> Path | None:
    """``<root>/<split>`` for a task-data path that names a split folder (``.../test``) or the root."""
    if path.is_file():
        path = path.parent
    for base in (path.parent, path, path / "data", path.parent / "data"):
        if (base / split).is_dir():
            return base / split
    return None


# ----------------------------------------------------------------------------- MMLU
def _mmlu_rows(path: Path) -> list[tuple[int, list[str]]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) != 6:
                raise _err(path, n, f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            if row[5] not in "ABCD" or len(row[5]) != 1:
                raise _err(path, n, f"answer column is {row[5]!r}, expected one of A, B, C, D")
            rows.append((n, row))
    return rows


def _mmlu_subject(file: Path) -> str:
    return re.sub(r"_(test|val|dev)$", "", file.stem)


def _mmlu_block(row: list[str], answer: bool) -> str:
    # hendrycks/test evaluate.py format_example: question, "\nX. choice" per choice, "\nAnswer:"
    s = row[0].strip() + "".join(f"\n{LETTERS[i]}. {row[1 + i]}" for i in range(4)) + "\nAnswer:"
    return s + (f" {row[5]}\n\n" if answer else "")


def load_mmlu(path: Path, shots: int = 5) -> list[Question]:
    """MMLU CSVs (no header: question, A, B, C, D, answer), one file per subject.

    Prompt (hendrycks/test ``evaluate.py``, = lm-eval ``mmlu`` with ``num_fewshot=5``):
    ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"`` then
    the first ``shots`` rows of ``dev/{subject}_dev.csv``, each ``"{q}\\nA. ..\\nB. ..\\nC. ..\\nD.
    ..\\nAnswer: {X}\\n\\n"``, then the question ending in ``"\\nAnswer:"``. Choices ``" A"``..``" D"``.
    """
    files = _files(path, "*.csv", "mmlu")
    dev = _split_dir(path, "dev")
    out = []
    for file in files:
        subject = _mmlu_subject(file)
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if shots:
            if dev is None or not (dev / f"{subject}_dev.csv").is_file():
                raise FileNotFoundError(f"mmlu: {shots}-shot prompts need {subject}_dev.csv in a dev/ folder next to "
                                        f"{file.parent} (or pass shots=0)")
            dev_rows = _mmlu_rows(dev / f"{subject}_dev.csv")[:shots]
            head += "".join(_mmlu_block(r, True) for _, r in dev_rows)
        for i, (n, row) in enumerate(_mmlu_rows(file)):
            out.append(Question(task="mmlu", subject=subject, index=i, prompt=head + _mmlu_block(row, False),
                                choices=tuple(f" {c}" for c in "ABCD"), gold=row[5], gold_index="ABCD".index(row[5]),
                                source=f"{file}:{n}", data={"question": row[0]}))
    return out


# ----------------------------------------------------------------------------- C-Eval
def _ceval_rows(path: Path) -> list[tuple[int, dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"question", "A", "B", "C", "D"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise _err(path, 1, f"header {reader.fieldnames} lacks {sorted(need - set(reader.fieldnames or []))}")
        rows = []
        for rec in reader:
            n = reader.line_num
            if None in rec or any(rec[k] is None for k in need):
                raise _err(path, n, "wrong number of columns")
            if "answer" in rec and rec["answer"] not in ("A", "B", "C", "D"):
                raise _err(path, n, f"answer is {rec['answer']!r}, expected one of A, B, C, D")
            rows.append((n, rec))
    return rows


def _ceval_block(rec: dict, answer: bool) -> str:
    # hkust-nlp/ceval (and lm-eval ceval-valid): question, "\nX. choice", "\n答案：" [+ answer]
    s = rec["question"].strip() + "".join(f"\n{c}. {rec[c]}" for c in "ABCD") + "\n答案："
    return s + (f"{rec['answer']}\n\n" if answer else "")


def load_ceval(path: Path, shots: int = 5) -> list[Question]:
    """C-Eval CSVs (header ``id,question,A,B,C,D,answer[,explanation]``), ``{subject}_{split}.csv``.

    Prompt (hkust-nlp/ceval ``code/evaluator_series/evaluators/llama.py``, answer-only setting):
    ``"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n"`` then ``shots`` dev
    examples ``"{q}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：{X}\\n\\n"`` and the question ending in
    ``"\\n答案："``. Choices ``"A"``..``"D"`` (no space after the colon, as the official prompt).
    The test split has no public answers: evaluate ``val``.
    """
    files = _files(path, "*.csv", "ceval")
    dev = _split_dir(path, "dev")
    out = []
    for file in files:
        subject = _mmlu_subject(file)
        head = f"以下是中国关于{subject.replace('_', ' ')}考试的单项选择题，请选出其中的正确答案。\n\n"
        if shots:
            if dev is None or not (dev / f"{subject}_dev.csv").is_file():
                raise FileNotFoundError(f"ceval: {shots}-shot prompts need {subject}_dev.csv in a dev/ folder")
            head += "".join(_ceval_block(r, True) for _, r in _ceval_rows(dev / f"{subject}_dev.csv")[:shots])
        for i, (n, rec) in enumerate(_ceval_rows(file)):
            if "answer" not in rec:
                raise _err(file, n, "no answer column (C-Eval's test split has no public answers; use val)")
            out.append(Question(task="ceval", subject=subject, index=i, prompt=head + _ceval_block(rec, False),
                                choices=tuple("ABCD"), gold=rec["answer"], gold_index="ABCD".index(rec["answer"]),
                                source=f"{file}:{n}", data={"question": rec["question"]}))
    return out


# ----------------------------------------------------------------------------- BoolQ
def load_boolq(path: Path, shots: int = 0) -> list[Question]:
    """BoolQ / SuperGLUE JSONL (``question``, ``passage``, ``label`` true/false).

    Prompt (lm-eval ``super_glue/boolq``, 0-shot): ``"{passage}\\nQuestion: {question}?\\nAnswer:"``;
    choices ``" no"``, ``" yes"``.
    """
    if shots:
        raise ValueError("boolq is evaluated 0-shot (lm-eval super_glue/boolq); shots must be 0")
    out = []
    for file in _files(path, "*.jsonl", "boolq"):
        for i, (n, rec) in enumerate(_read_jsonl(file)):
            label = rec.get("label", rec.get("answer"))
            _require(file, n, rec, {"question": str, "passage": str})
            # SuperGLUE ships JSON booleans; some copies write "true"/"false" or 1/0.
            if isinstance(label, str) and label.lower() in ("true", "false"):
                label = label.lower() == "true"
            elif isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
                label = bool(label)
            if not isinstance(label, bool):
                raise _err(file, n, f"'label' (or 'answer') should be true/false, got {label!r}")
            out.append(Question(task="boolq", subject="boolq", index=i,
                                prompt=f"{rec['passage']}\nQuestion: {rec['question']}?\nAnswer:",
                                choices=(" no", " yes"), gold="yes" if label else "no", gold_index=int(label),
                                source=f"{file}:{n}", data={"question": rec["question"]}))
    return out


def extract_yes_no(text: str, q: Question | None = None) -> str:
    """First ``yes`` / ``no`` word of a generated answer (lower-cased), or ``""``."""
    m = re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
    return m.group(1).lower() if m else ""


# ----------------------------------------------------------------------------- GSM8K
# Wei et al. (2022) chain-of-thought exemplars, as in lm-eval gsm8k-cot.yaml (num_fewshot 8).
GSM8K_COT = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
     "will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
     "21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they "
     "had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
     "give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The "
     "answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The "
     "answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]

_GSM8K_GOLD = re.compile(r"#### (\-?[0-9\.\,]+)")          # openai/grade-school-math dataset.py ANS_RE
_GSM8K_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")  # lm-eval gsm8k-cot strict-match
_GSM8K_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")   # lm-eval gsm8k-cot flexible-extract (last match)


def normalize_number(s: str) -> str:
    """lm-eval's gsm8k exact-match normalisation: drop ``,``, ``$``, a trailing ``.``; strip."""
    s = s.strip().replace(",", "").replace("$", "")
    return re.sub(r"\.$", "", s).strip()


def gsm8k_gold(answer: str) -> str | None:
    """The gold number after ``#### `` (grade-school-math ``extract_answer``), commas removed."""
    m = _GSM8K_GOLD.search(answer)
    return m.group(1).strip().replace(",", "") if m else None


def extract_gsm8k(text: str, q: Question | None = None) -> str:
    """Strict: the number in the first ``The answer is N.``, normalised; ``""`` if absent."""
    m = _GSM8K_STRICT.search(text)
    return normalize_number(m.group(1)) if m else ""


def extract_gsm8k_flexible(text: str, q: Question | None = None) -> str:
    """Flexible: the last number in the text (lm-eval ``flexible-extract``), normalised."""
    ms = _GSM8K_FLEX.findall(text)
    if not ms:
        return ""
    last = ms[-1]
    return normalize_number(last[0] or last[1])


def load_gsm8k(path: Path, shots: int = 8) -> list[Question]:
    """GSM8K JSONL (``question``, ``answer`` ending in ``#### N``).

    Prompt (lm-eval ``gsm8k-cot``, 8-shot, Wei et al. exemplars): ``"Q: {q}\\nA: {cot}\\n\\n"`` per
    exemplar, then ``"Q: {question}\\nA:"``; stop at ``"Q:"``; answer = number after ``The answer is``.
    """
    if shots > len(GSM8K_COT):
        raise ValueError(f"gsm8k has {len(GSM8K_COT)} chain-of-thought exemplars; shots={shots}")
    head = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in GSM8K_COT[:shots])
    out = []
    for file in _files(path, "*.jsonl", "gsm8k"):
        if file.name.startswith("train") and path.is_dir():
            continue  # the exemplar pool, not the evaluation split
        for i, (n, rec) in enumerate(_read_jsonl(file)):
            _require(file, n, rec, {"question": str, "answer": str})
            gold = gsm8k_gold(rec["answer"])
            if gold is None:
                raise _err(file, n, "answer has no '#### N' final line")
            out.append(Question(task="gsm8k", subject="gsm8k", index=i, prompt=f"{head}Q: {rec['question']}\nA:",
                                choices=None, gold=gold, gold_index=None, source=f"{file}:{n}",
                                data={"question": rec["question"]}))
    return out


# ----------------------------------------------------------------------------- BBH
_BBH_ANSWER = re.compile(r"(?<=the answer is )(.*)(?=.)")  # lm-eval bbh cot_fewshot get-answer


def extract_bbh(text: str, q: Question | None = None) -> str:
    """The text after the first ``the answer is `` up to its last character (lm-eval's regex:
    ``(?<=the answer is )(.*)(?=.)``, which drops the final period); ``""`` if absent."""
    m = _BBH_ANSWER.search(text)
    return m.group(1) if m else ""


def _bbh_prompt_file(path: Path, task: str) -> Path | None:
    base = path.parent if path.is_file() else path
    for d in (base / "cot-prompts", base.parent / "cot-prompts", base.parent.parent / "cot-prompts"):
        if (d / f"{task}.txt").is_file():
            return d / f"{task}.txt"
    return None


def _bbh_cot(file: Path) -> str:
    text = file.read_text(encoding="utf-8")
    # Official files: a canary line, a "-----" line, then the task description and 3 exemplars.
    if "-----\n" not in text:
        raise _err(file, 1, "expected the canary line and a '-----' separator before the prompt")
    return text.split("-----\n", 1)[1].strip()


def load_bbh(path: Path, shots: int = 3) -> list[Question]:
    """BIG-Bench Hard task JSON (``{"examples": [{"input", "target"}]}``) plus ``cot-prompts/{task}.txt``.

    Prompt (suzgunmirac/BIG-Bench-Hard cot-prompts, 3-shot CoT, as lm-eval ``bbh_cot_fewshot``): the
    prompt file's text (task description and three ``Q: ... A: Let's think step by step. ...``
    exemplars), ``"\\n\\nQ: {input}\\nA: Let's think step by step."``; stop at ``"\\n\\n"`` /
    ``"Q"``; answer extracted by lm-eval's ``(?<=the answer is )(.*)(?=.)``; exact match to ``target``.
    """
    if shots not in (0, 3):
        raise ValueError("bbh: the official chain-of-thought prompts have 3 exemplars; shots must be 3 (or 0)")
    out = []
    for file in _files(path, "*.json", "bbh"):
        task = file.stem
        head = ""
        if shots:
            pf = _bbh_prompt_file(file, task)
            if pf is None:
                raise FileNotFoundError(f"bbh: no cot-prompts/{task}.txt next to {file.parent}")
            head = _bbh_cot(pf) + "\n\n"
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise _err(file, e.lineno, f"not valid JSON ({e.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
            raise _err(file, 1, "expected an object with an 'examples' list")
        for i, ex in enumerate(data["examples"]):
            if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("target"), str):
                raise _err(file, 1, f"examples[{i}] needs string 'input' and 'target'")
            out.append(Question(task="bbh", subject=task, index=i,
                                prompt=f"{head}Q: {ex['input']}\nA: Let's think step by step.",
                                choices=None, gold=ex["target"], gold_index=None, source=f"{file}:examples[{i}]",
                                data={"question": ex["input"]}))
    return out


# ----------------------------------------------------------------------------- AGIEval
AGIEVAL_EN = ("lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "aqua-rat", "sat-en-without-passage",
              "gaokao-english")
AGIEVAL_ZH = ("logiqa-zh", "jec-qa-kd", "jec-qa-ca", "gaokao-chinese", "gaokao-geography", "gaokao-history",
              "gaokao-biology", "gaokao-chemistry", "gaokao-physics", "gaokao-mathqa")


def find_first_capital_letter(text: str) -> str:
    """AGIEval ``post_process.find_first_capital_letter``: the first of A-F in the text."""
    for c in text:
        if c in "ABCDEF":
            return c
    return ""


def extract_agieval(text: str, q: Question | None = None) -> str:
    """AGIEval ``post_process`` for single-answer questions: zero-shot -> first capital A-F;
    few-shot -> ``answer is .*?([A-G])`` (``答案是`` in Chinese), else the first capital letter."""
    few = bool(q is not None and q.data.get("setting") == "few-shot")
    if not few:
        return find_first_capital_letter(text)
    zh = q is not None and q.subject in AGIEVAL_ZH
    m = re.search("答案是.*?([A-G])" if zh else "answer is .*?([A-G])", text)
    return m.group(1) if m else find_first_capital_letter(text)


def extract_choice_letter(text: str, q: Question | None = None) -> str:
    """ModelLink's MMLU / C-Eval extraction: ``.*([A-D])\\..*`` else the first ``[A-D]``
    (``re.match``) after stripping leading spaces; ``""`` if none."""
    t = text.lstrip()
    for pat in (r".*(?P<answer>[A|B|C|D])\..*", r"(?P<answer>[A|B|C|D])"):
        m = re.match(pat, t)
        if m:
            return m.group("answer")
    m = re.search(r"[ABCD]", t)  # the first letter anywhere (a continuation after "答案：" / "Answer:")
    return m.group(0) if m else ""


def _agieval_demos(csv_path: Path, dataset: str) -> list[str]:
    """AGIEval ``combine_prompt(load_explanation=False)``: the demonstrations of ``dataset``."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or dataset not in rows[0]:
        raise _err(csv_path, 1, f"no column {dataset!r} in the header")
    col = rows[0].index(dataset)
    demos = []
    for r in (1, 3, 5, 7, 9):  # the context rows (explanations on the even rows)
        if r >= len(rows) or col >= len(rows[r]) or not rows[r][col]:
            continue
        try:
            con = ast.literal_eval(rows[r][col])  # a Python dict literal, as the official loader reads it
        except (ValueError, SyntaxError) as e:
            raise _err(csv_path, r + 1, f"column {dataset!r}: not a Python dict literal ({e})") from None
        idx = len(demos)
        passage = con.get("passage") or ""
        options = con.get("options") or ""
        label = con.get("label") or ""
        if dataset in AGIEVAL_ZH:
            demos.append(f"问题 {idx + 1}.   {passage} {con['question']}\n从以下选项中选择:    {' '.join(options)}\n"
                         f"答案是 {label}\n")
        else:
            demos.append(f"Problem {idx + 1}.   {passage} {con['question']}\nChoose from the following options:    "
                         f"{' '.join(options)}\nThe answer is therefore {label}\n")
    return demos


def load_agieval(path: Path, shots: int = 0) -> list[Question]:
    """AGIEval v1 JSONL (``passage``, ``question``, ``options`` like ``"(A)..."``, ``label``).

    Single-answer multiple-choice datasets only (English and Chinese QA). Prompts are the official
    ``dataset_loader.py``: zero-shot ``"{passage}Q: {q} Answer Choices: {options}\\nA: Among A through
    {last}, the answer is"`` (Chinese: ``问题：… 选项：… 答案：从A到{last}, 我们应选择``); few-shot
    (``shots > 0``, no CoT): ``"Here are the answers for the problems in the exam.\\n"`` + the first
    ``shots`` demonstrations of ``few_shot_prompts.csv`` + ``"Problem {n+1}.   {passage} {q}\\nChoose
    from the following options:    {options}\\n"``. Choices ``" A"``.. for log-likelihood.
    """
    out = []
    for file in _files(path, "*.jsonl", "agieval"):
        ds = file.stem
        if ds not in AGIEVAL_EN + AGIEVAL_ZH or ds in ("jec-qa-kd", "jec-qa-ca", "gaokao-physics"):
            raise FileNotFoundError(f"agieval: {file.name} is not a single-answer multiple-choice dataset "
                                    f"(supported: {', '.join(d for d in AGIEVAL_EN + AGIEVAL_ZH)} except the "
                                    "multi-answer jec-qa-kd, jec-qa-ca, gaokao-physics)")
        zh = ds in AGIEVAL_ZH
        head = ""
        n_shot = 0
        if shots:
            base = file.parent
            csv_path = next((p for p in (base / "few_shot_prompts.csv", base.parent / "few_shot_prompts.csv",
                                         base.parent.parent / "few_shot_prompts.csv") if p.is_file()), None)
            if csv_path is None:
                raise FileNotFoundError(f"agieval: {shots}-shot prompts need few_shot_prompts.csv near {file}")
            demos = _agieval_demos(csv_path, ds)[:shots]
            n_shot = len(demos)
            head = ("以下是考试中各个问题的答案。\n" if zh else "Here are the answers for the problems in the exam.\n")
            head += "".join(d + "\n" for d in demos)
        for i, (n, rec) in enumerate(_read_jsonl(file)):
            _require(file, n, rec, {"question": str, "options": list, "label": str})
            opts = rec["options"]
            if not opts or any(not isinstance(o, str) for o in opts):
                raise _err(file, n, "'options' should be a non-empty list of strings")
            k = len(opts)
            if rec["label"] not in LETTERS[:k]:
                raise _err(file, n, f"label {rec['label']!r} is not one of the {k} option letters")
            passage = rec.get("passage") or ""
            if shots:
                if zh:
                    body = f"问题 {n_shot + 1}.   {passage} {rec['question']}\n从以下选项中选择:    {' '.join(opts)}\n"
                else:
                    body = (f"Problem {n_shot + 1}.   {passage} {rec['question']}\nChoose from the following options:"
                            f"    {' '.join(opts)}\n")
            else:
                last = LETTERS[(k if k > 1 else (4 if zh else 5)) - 1]
                if zh:
                    body = f"{passage}问题：{rec['question']} 选项：{' '.join(opts)}\n答案：从A到{last}, 我们应选择"
                else:
                    body = f"{passage}Q: {rec['question']} Answer Choices: {' '.join(opts)}\nA: Among A through {last}, " \
                           "the answer is"
            out.append(Question(task="agieval", subject=ds, index=i, prompt=head + body,
                                choices=tuple(f" {c}" for c in LETTERS[:k]), gold=rec["label"],
                                gold_index=LETTERS.index(rec["label"]), source=f"{file}:{n}",
                                data={"question": rec["question"], "setting": "few-shot" if shots else "zero-shot"}))
    return out


# ----------------------------------------------------------------------------- HumanEval
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex paper / human-eval / lm-eval humaneval


def load_humaneval(path: Path, shots: int = 0) -> list[Question]:
    """HumanEval JSONL or ``.jsonl.gz`` (``task_id``, ``prompt``, ``entry_point``, ``test``,
    ``canonical_solution``). 0-shot: the prompt is the function signature and docstring; the
    completion is generated until one of :data:`HUMANEVAL_STOP`."""
    if shots:
        raise ValueError("humaneval is 0-shot (openai/human-eval); shots must be 0")
    files = [path] if path.is_file() else sorted(list(path.glob("*.jsonl")) + list(path.glob("*.jsonl.gz")))
    if not files:
        raise FileNotFoundError(f"humaneval: no .jsonl / .jsonl.gz in {path}")
    out = []
    for file in files:
        for i, (n, rec) in enumerate(_read_jsonl(file)):
            _require(file, n, rec, {"task_id": str, "prompt": str, "entry_point": str, "test": str})
            out.append(Question(task="humaneval", subject="humaneval", index=i, prompt=rec["prompt"], choices=None,
                                gold=rec.get("canonical_solution", ""), gold_index=None, source=f"{file}:{n}",
                                data=dict(rec)))
    return out


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval's ``check_correctness`` runs: prompt + completion + test + check call."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n")


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest stop string (exclusive)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _identity(text: str, q: Question | None = None) -> str:
    return text


TASKS: dict[str, Task] = {
    "mmlu": Task(name="mmlu", kind="choice", load=load_mmlu, shots=5, stop=("\n",), max_new_tokens=1,
                 extract=extract_choice_letter),
    "ceval": Task(name="ceval", kind="choice", load=load_ceval, shots=5, stop=("\n",), max_new_tokens=1,
                  extract=extract_choice_letter, language="zh"),
    "boolq": Task(name="boolq", kind="choice", load=load_boolq, shots=0, stop=("\n",), max_new_tokens=2,
                  extract=extract_yes_no),
    "agieval": Task(name="agieval", kind="choice", load=load_agieval, shots=0, stop=("\n\n",), max_new_tokens=5,
                    extract=extract_agieval),
    "gsm8k": Task(name="gsm8k", kind="generate", load=load_gsm8k, shots=8, stop=("Q:", "</s>", "<|im_end|>"),
                  max_new_tokens=256, extract=extract_gsm8k),
    "bbh": Task(name="bbh", kind="generate", load=load_bbh, shots=3, stop=("</s>", "Q", "\n\n"), max_new_tokens=256,
                extract=extract_bbh),
    "human_eval": Task(name="human_eval", kind="code", load=load_humaneval, shots=0, stop=HUMANEVAL_STOP,
                       max_new_tokens=512, extract=_identity),
}
TASKS["humaneval"] = TASKS["human_eval"]


def get_task(name: str) -> Task:
    """The task named ``name`` (ModelLink's ``--task`` names: mmlu, ceval, boolq, gsm8k, bbh,
    agieval, human_eval)."""
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None


def load_questions(task: str | Task, path: str | Path, *, shots: int | None = None,
                   limit: int | None = None) -> list[Question]:
    """Read a task's files.

    Args:
      task: a :class:`Task` or its name.
      path: the data folder or file (ModelLink's ``--task-data-path``).
      shots: few-shot count (default: the task's).
      limit: keep the first ``limit`` questions of each subject (ModelLink ``--max-eval-samples``).

    Returns:
      The questions, in file order.
    """
    t = get_task(task) if isinstance(task, str) else task
    qs = t.load(Path(path), t.shots if shots is None else shots)
    if limit is not None:
        qs = [q for q in qs if q.index < limit]
    return qs

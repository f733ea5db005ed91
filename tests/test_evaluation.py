"""pmodel.evaluation: readers, extraction on the official examples, log-likelihood equivalence,
batched generation, the HumanEval sandbox (each limit) and pass@k."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
import torch

import pmodel
from pmodel import evaluation as ev
from pmodel.evaluation import tasks as T

STOP = object()


# ----------------------------------------------------------------------------- extraction
def test_gsm8k_gold_and_extraction_official_examples(shared_data):
    recs = [json.loads(line) for line in (shared_data / "eval/gsm8k/test_first250.jsonl").open()][:3]
    # grade-school-math's own answers end in "#### N": Janet's ducks = 18, robe = 3, house flip = 70000
    assert [ev.gsm8k_gold(r["answer"]) for r in recs] == ["18", "3", "70000"]
    assert ev.gsm8k_gold("so #### 1,234") == "1234"
    # the lm-eval gsm8k-cot exemplars' own answers are extracted by the strict rule
    for q, a in T.GSM8K_COT:
        assert ev.extract_gsm8k(a) == a.rsplit("The answer is ", 1)[1].rstrip(".")
    assert ev.extract_gsm8k("She has 3 left. The answer is 1,000.") == "1000"
    assert ev.extract_gsm8k("The answer is $5.") == ""  # lm-eval strict-match: no "$" in the number
    assert ev.extract_gsm8k("no final sentence 42") == ""
    assert ev.extract_gsm8k_flexible("no final sentence 42, then 7.") == "7"


def test_bbh_target_extraction_on_official_cot_prompts(shared_data):
    # every exemplar in the official cot-prompts ends "So the answer is <target>."
    n = 0
    for f in sorted((shared_data / "eval/bbh/cot-prompts").glob("*.txt")):
        text = T._bbh_cot(f)
        for block in text.split("\n\nQ: ")[1:]:
            answer_line = block.strip().splitlines()[-1]
            got = ev.extract_bbh(answer_line)
            assert got and answer_line.endswith(f"the answer is {got}."), (f.name, answer_line)
            n += 1
    assert n == 12
    assert ev.extract_bbh("So the answer is (B).") == "(B)"
    assert ev.extract_bbh("So the answer is No.") == "No"
    assert ev.extract_bbh("nothing here") == ""


def test_agieval_letter_extraction():
    zero = ev.Question(task="agieval", subject="sat-math", index=0, prompt="", choices=(" A",), gold="A",
                       gold_index=0, source="x", data={"setting": "zero-shot"})
    few = ev.Question(task="agieval", subject="sat-math", index=0, prompt="", choices=(" A",), gold="A",
                      gold_index=0, source="x", data={"setting": "few-shot"})
    zh = ev.Question(task="agieval", subject="logiqa-zh", index=0, prompt="", choices=(" A",), gold="A",
                     gold_index=0, source="x", data={"setting": "few-shot"})
    assert ev.extract_agieval(" (C) is right", zero) == "C"
    assert ev.extract_agieval("all lower case", zero) == ""
    assert ev.extract_agieval("Because B fails, the answer is therefore D", few) == "D"
    assert ev.extract_agieval("Explanation: E is wrong", few) == "E"  # first capital fallback
    assert ev.extract_agieval("分析……答案是 B", zh) == "B"


def test_choice_letter_extraction_mmlu_ceval():
    assert ev.extract_choice_letter(" B") == "B"
    assert ev.extract_choice_letter("C. 12") == "C"
    assert ev.extract_choice_letter("A") == "A"
    assert ev.extract_choice_letter("答案是D") == "D"
    assert ev.extract_choice_letter(" none") == ""


def test_pass_at_k_matches_human_eval_estimator():
    import numpy as np

    def ref(n, c, k):  # openai/human-eval execution.estimate_pass_at_k
        if n - c < k:
            return 1.0
        return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))
    for n, c, k in [(1, 1, 1), (1, 0, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 19, 10), (200, 37, 100)]:
        assert abs(ev.pass_at_k(n, c, k) - ref(n, c, k)) < 1e-12
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)


# ----------------------------------------------------------------------------- readers
def test_readers_count_the_shared_subsets(shared_data):
    e = shared_data / "eval"
    counts = {"mmlu": (e / "mmlu/data/test", 641), "ceval": (e / "ceval/val", 98), "boolq": (e / "boolq", 400),
              "gsm8k": (e / "gsm8k", 250), "bbh": (e / "bbh/bbh", 1000), "agieval": (e / "agieval/v1", 1125),
              "human_eval": (e / "humaneval", 40)}
    for task, (path, n) in counts.items():
        qs = ev.load_questions(task, path)
        assert len(qs) == n, task
    q = ev.load_questions("mmlu", e / "mmlu/data/test")[0]
    assert q.prompt.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                               "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\n"
                               "Answer: B\n\n")
    assert q.prompt.endswith("\nAnswer:") and q.prompt.count("Answer:") == 6
    g = ev.load_questions("gsm8k", e / "gsm8k")[0]
    assert g.prompt.count("Q: ") == 9 and g.prompt.endswith("\nA:")
    b = ev.load_questions("bbh", e / "bbh/bbh/web_of_lies.json")[0]
    assert b.prompt.startswith("Evaluate a random boolean function expressed as a word problem.\n\nQ: ")
    assert b.prompt.endswith("\nA: Let's think step by step.") and b.prompt.count("\n\nQ: ") == 4  # 3 exemplars + the question
    a = ev.load_questions("agieval", e / "agieval/v1/sat-math.jsonl")[0]
    assert a.prompt == ("Q: If $\\frac{x-1}{3}=k$ and $k=3$, what is the value of $x ?$ Answer Choices: (A)2 (B)4 "
                        "(C)9 (D)10\nA: Among A through D, the answer is")
    assert ev.load_questions("mmlu", e / "mmlu/data/test", limit=3)[-1].index == 2
    assert len(ev.load_questions("mmlu", e / "mmlu/data/test", limit=3)) == 12


@pytest.mark.parametrize("task,name,text,msg", [
    ("boolq", "x.jsonl", '{"question": "q", "passage": "p", "label": true}\n{"question": "q"\n', "x.jsonl:2: not valid"),
    ("boolq", "x.jsonl", '{"question": "q", "passage": "p", "label": true}\n{"question": "q", "passage": "p"}\n',
     "x.jsonl:2: 'label'"),
    ("gsm8k", "test.jsonl", '{"question": "q", "answer": "no marker"}\n', "test.jsonl:1: answer has no '#### N'"),
    ("human_eval", "h.jsonl", '{"task_id": "t", "prompt": "p", "entry_point": "f"}\n', "h.jsonl:1: missing field 'test'"),
    ("mmlu", "s_test.csv", "q,a,b,c,d,A\nq,a,b,c,d\n", "s_test.csv:2: expected 6 columns"),
    ("mmlu", "s_test.csv", "q,a,b,c,d,E\n", "s_test.csv:1: answer column is 'E'"),
    ("agieval", "sat-math.jsonl", '{"passage": "", "question": "q", "options": ["(A)1", "(B)2"], "label": "C"}\n',
     "sat-math.jsonl:1: label 'C'"),
])
def test_malformed_records_name_file_and_line(tmp_path, task, name, text, msg):
    (tmp_path / name).write_text(text)
    with pytest.raises(ev.TaskDataError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        ev.load_questions(task, tmp_path / name, shots=0)


def test_ceval_malformed_answer(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "s_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,Z\n")
    with pytest.raises(ev.TaskDataError, match=r"s_val.csv:3: answer is 'Z'"):
        ev.load_questions("ceval", tmp_path / "val", shots=0)


# ----------------------------------------------------------------------------- log-likelihood
@pytest.fixture(scope="module")
def tiny64():
    model = pmodel.families.preset("debug")
    model = pmodel.model.build(model.config.replace(dtype=torch.float64, num_layers=2), family="llama")
    return model, pmodel.init(model, seed=3)


def test_loglikelihood_equals_naive_per_choice(tiny64):
    model, params = tiny64
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    reqs = []
    for n_ctx, lens in [(5, (1, 1, 1, 1)), (9, (3, 1, 4)), (2, (2, 2)), (7, (1, 5))]:
        ctx = tuple(torch.randint(0, V, (n_ctx,), generator=g).tolist())
        conts = tuple(tuple(torch.randint(0, V, (m,), generator=g).tolist()) for m in lens)
        reqs.append(ev.LoglikelihoodRequest(ctx, conts))
    got = ev.loglikelihood(model, params, reqs)
    for r, out in zip(reqs, got):
        for c, (ll, greedy) in zip(r.continuations, out):
            ref_ll, ref_greedy = ev.loglikelihood_naive(model, params, r.context, c)
            assert abs(ll - ref_ll) < 1e-10 and greedy == ref_greedy
    # one request alone gives the same numbers as inside the batch (the batch is not mixed)
    alone = ev.loglikelihood(model, params, reqs[1:2])[0]
    assert all(abs(a[0] - b[0]) < 1e-10 for a, b in zip(alone, got[1]))


def test_loglikelihood_greedy_flag_and_truncation(tiny64):
    model, params = tiny64
    ctx = (1, 5, 9, 11)
    logits = model.apply(params, torch.tensor([ctx]))[0, -1]
    top = int(logits.argmax())
    other = (top + 1) % model.config.vocab_size
    (a, ga), (b, gb) = ev.loglikelihood(model, params, [ev.LoglikelihoodRequest(ctx, ((top,), (other,)))])[0]
    assert ga and not gb and a > b
    # a window of 3 input tokens: the context is cut from the left to (9, 11) + 1 continuation token
    cut = ev.loglikelihood(model, params, [ev.LoglikelihoodRequest(ctx, ((top,),))], max_len=2)[0][0][0]
    assert abs(cut - ev.loglikelihood_naive(model, params, (9, 11), (top,))[0]) < 1e-10


def test_choice_metrics_acc_norm_uses_characters():
    m = ev.choice_metrics([-4.0, -6.0], [" ab", " abcdef"], 1)
    assert m == {"pred": 0, "pred_norm": 1, "acc": 0.0, "acc_norm": 1.0}


# ----------------------------------------------------------------------------- generation
def test_generate_until_batched_equals_alone_and_stops(tiny64):
    model, params = tiny64

    def decode(ids):
        return "".join(chr(97 + i % 26) for i in ids)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    alone = [ev.generate_until(model, params, [p], max_new_tokens=8, decode=decode)[0] for p in prompts]
    both = ev.generate_until(model, params, prompts, max_new_tokens=8, decode=decode)
    assert both == alone and all(len(x) == 8 for x in alone)
    # a stop string: the text ends before it; greedy ids equal pmodel.generate's
    full = pmodel.generate(model, params, prompts[0], max_new_tokens=8)[3:].tolist()
    assert decode(full) == alone[0]
    s = alone[0][3:5]
    got = ev.generate_until(model, params, [prompts[0]], max_new_tokens=8, decode=decode, stop=[s])[0]
    assert got == alone[0][:alone[0].find(s)]
    # an eos id ends the row without entering the text
    got = ev.generate_until(model, params, [prompts[0]], max_new_tokens=8, decode=decode, eos_ids=[full[2]])[0]
    assert got == decode(full[:full.index(full[2])])


# ----------------------------------------------------------------------------- sandbox
needs_ns = pytest.mark.skipif(ev.sandbox_available() is not None,
                              reason="this kernel refuses user/mount/network namespaces")


@needs_ns
def test_sandbox_infinite_loop_times_out():
    t = time.perf_counter()
    r = ev.run_python("while True:\n    pass\n", limits=ev.SandboxLimits(timeout_s=1.5, cpu_s=30))
    assert r.status == "timed out" and time.perf_counter() - t < 8


@needs_ns
def test_sandbox_cpu_limit_kills_busy_loop():
    r = ev.run_python("while True:\n    pass\n", limits=ev.SandboxLimits(timeout_s=30, cpu_s=1))
    assert r.status == "failed" and r.wall_s < 10  # SIGXCPU / SIGKILL from RLIMIT_CPU, well before 30 s


@needs_ns
def test_sandbox_fork_bomb_is_contained():
    code = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n"
            "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('forks', n, type(e).__name__)\n")
    r = ev.run_python(code, limits=ev.SandboxLimits(timeout_s=10, processes=8))
    assert r.stdout.startswith("forks ") and int(r.stdout.split()[1]) < 8 and "BlockingIOError" in r.stdout
    assert r.wall_s < 10
    # every sleeping child died with the PID namespace: no process of the sandbox uid survives
    left = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if "_sandbox_child.py" in open(f"/proc/{pid}/cmdline").read():
                    left.append(pid)
            except OSError:
                pass
    assert not left


@needs_ns
def test_sandbox_memory_limit():
    r = ev.run_python("x = bytearray(10 * 2**30)\n", limits=ev.SandboxLimits(memory_bytes=1 << 30))
    assert r.status == "failed" and "MemoryError" in r.stderr


@needs_ns
def test_sandbox_open_files_limit():
    code = "fs = [open(f'f{i}', 'w') for i in range(200)]\n"
    r = ev.run_python(code, limits=ev.SandboxLimits(open_files=32))
    assert r.status == "failed" and "Too many open files" in r.stderr


@needs_ns
def test_sandbox_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    code = (f"open({str(target)!r}, 'w').write('x')\n")
    r = ev.run_python(code)
    assert r.status == "failed" and not target.exists()
    assert "Read-only file system" in r.stderr or "Permission denied" in r.stderr
    r = ev.run_python("open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n")
    assert r.passed and r.stdout.strip() == "ok"


@needs_ns
def test_sandbox_has_no_network():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    got = []

    def accept():
        try:
            got.append(srv.accept())
        except OSError:
            pass
    th = threading.Thread(target=accept)
    th.start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')\n"
    r = ev.run_python(code)
    th.join()
    srv.close()
    assert r.status == "failed" and "connected" not in r.stdout and not got
    assert "Network is unreachable" in r.stderr or "Connection refused" in r.stderr


@needs_ns
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(shared_data):
    qs = ev.load_questions("human_eval", shared_data / "eval/humaneval")
    cfg = ev.EvalConfig(progress=False, sandbox=ev.SandboxLimits(timeout_s=10))
    good = [{"task_id": q.data["task_id"], "completion": q.data["canonical_solution"]} for q in qs]
    recs = ev.score_samples(qs, good, cfg)
    assert len(recs) == 40 and all(r["pass@1"] == 1.0 for r in recs), [r["samples"][0]["error"] for r in recs
                                                                       if r["pass@1"] < 1]
    assert ev.summarize(ev.get_task("human_eval"), recs, cfg)["overall"]["pass@1_micro"] == 1.0
    bad = [{"task_id": q.data["task_id"], "completion": "    return None\n"} for q in qs[:10]]
    recs = ev.score_samples(qs, bad, cfg)
    assert len(recs) == 10 and all(r["pass@1"] == 0.0 for r in recs)
    # n = 2 samples, one right and one wrong: pass@1 = 0.5, pass@2 = 1
    two = [good[0], {"task_id": good[0]["task_id"], "completion": "    return None\n"}]
    rec = ev.score_samples(qs, two, ev.EvalConfig(progress=False, num_samples=2, temperature=1.0, pass_k=(1, 2)))[0]
    assert rec["pass@1"] == 0.5 and rec["pass@2"] == 1.0


def test_sampled_rows_do_not_depend_on_the_batch(tiny64):
    model, params = tiny64

    def decode(ids):
        return " ".join(map(str, ids))
    kw = dict(max_new_tokens=6, decode=decode, temperature=0.8, top_p=0.9)
    both = ev.generate_until(model, params, [[1, 2, 3], [4, 5]], seeds=[11, 12], **kw)
    assert ev.generate_until(model, params, [[4, 5]], seeds=[12], **kw) == both[1:]
    assert ev.generate_until(model, params, [[1, 2, 3]], seeds=[11], **kw) == both[:1]
    with pytest.raises(ValueError, match="one seed per prompt"):
        ev.generate_until(model, params, [[1]], **kw)

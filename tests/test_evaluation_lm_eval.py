"""pmodel as an lm-evaluation-harness backend, against lm-eval's own ``hf`` backend on stories260K:
same per-question log-likelihoods (1e-4) and accuracy on a local MMLU task YAML (no network), same
greedy generations, same rolling log-likelihoods; and ``--model pmodel`` through lm-eval's CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval (optional extra) is not installed")
pytest.importorskip("transformers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _tasks(d: Path, shared: Path) -> Path:
    mm = shared / "eval/mmlu/data"
    (d / "pm_mmlu.yaml").write_text(f"""task: pm_mmlu_world_religions
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {mm / 'test/world_religions_test.csv'}
    dev: {mm / 'dev/world_religions_dev.csv'}
  column_names: [question, A, B, C, D, answer]
output_type: multiple_choice
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
description: "The following are multiple choice questions (with answers) about world religions.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    stories = d / "stories.jsonl"
    text = (shared / "pretrain/tinystories_train_2MiB.txt").read_text(encoding="utf-8").split("<|endoftext|>")
    stories.write_text("".join(json.dumps({"text": t.strip()}) + "\n" for t in text[:4]))
    (d / "pm_gen.yaml").write_text(f"""task: pm_stories_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {stories}
output_type: generate_until
test_split: test
doc_to_text: "{{{{text[:60]}}}}"
doc_to_target: "{{{{text[60:80]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
""")
    (d / "pm_roll.yaml").write_text(f"""task: pm_stories_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {stories}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""")
    return d


def _run(model, tasks, d, limit=None, **kw):
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=TaskManager(include_path=str(d)),
                                   limit=limit, log_samples=True, **kw)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    shared = ROOT.parents[0] / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("../shared/data not present (fresh clone)")
    d = _tasks(tmp_path_factory.mktemp("tasks"), shared)
    from pmodel.evaluation.harness import PModelLM
    stories = str(shared / "models/stories260K")
    pm = PModelLM(pretrained=stories, batch_size=4, max_length=512)
    from lm_eval.models.huggingface import HFLM
    hf = HFLM(pretrained=stories, batch_size=4, max_length=512, dtype="float32", device="cpu")
    tasks = ["pm_mmlu_world_religions", "pm_stories_gen", "pm_stories_ppl"]
    kw = dict(num_fewshot=None, bootstrap_iters=0)
    return _run(pm, tasks, d, limit=40, **kw), _run(hf, tasks, d, limit=40, **kw), d, stories


def test_mmlu_loglikelihoods_and_accuracy_equal_hf(both):
    pm, hf, _, _ = both
    a, b = pm["samples"]["pm_mmlu_world_religions"], hf["samples"]["pm_mmlu_world_religions"]
    assert len(a) == len(b) == 40
    worst = 0.0
    for x, y in zip(sorted(a, key=lambda s: s["doc_id"]), sorted(b, key=lambda s: s["doc_id"])):
        assert x["arguments"] == y["arguments"]  # the same prompts and choices
        for (lx, gx), (ly, gy) in zip([r[0] for r in x["resps"]], [r[0] for r in y["resps"]]):
            worst = max(worst, abs(float(lx) - float(ly)))
            assert gx == gy
    assert worst < 1e-4, worst
    ra, rb = pm["results"]["pm_mmlu_world_religions"], hf["results"]["pm_mmlu_world_religions"]
    assert ra["acc,none"] == rb["acc,none"] and ra["acc_norm,none"] == rb["acc_norm,none"]


def test_generate_until_equals_hf(both):
    pm, hf, _, _ = both
    a, b = pm["samples"]["pm_stories_gen"], hf["samples"]["pm_stories_gen"]
    ga = [s["resps"][0][0] for s in sorted(a, key=lambda s: s["doc_id"])]
    gb = [s["resps"][0][0] for s in sorted(b, key=lambda s: s["doc_id"])]
    assert ga == gb and any(g.strip() for g in ga)


def test_loglikelihood_rolling_equals_hf(both):
    pm, hf, _, _ = both
    a, b = pm["samples"]["pm_stories_ppl"], hf["samples"]["pm_stories_ppl"]
    for x, y in zip(sorted(a, key=lambda s: s["doc_id"]), sorted(b, key=lambda s: s["doc_id"])):
        assert abs(float(x["resps"][0][0]) - float(y["resps"][0][0])) < 1e-3


def test_model_pmodel_through_lm_evals_cli(both, tmp_path):
    _, _, d, stories = both
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pmodel.evaluation.harness", "run", "--model", "pmodel", "--model_args",
                        f"pretrained={stories},max_length=512", "--tasks", "pm_mmlu_world_religions",
                        "--include_path", str(d), "--limit", "5", "--output_path", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert files, r.stdout[-2000:]
    res = json.loads(files[0].read_text())
    assert "pm_mmlu_world_religions" in res["results"] and res["config"]["model"] == "pmodel"

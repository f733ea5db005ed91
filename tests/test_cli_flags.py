"""Frozen flags: the accepted flag set of every CLI is recorded here.

Adding or removing a flag fails this test until the record below is updated, so no flag silently
disappears (ModelLink users' scripts rely on them) and none appears undocumented. Update a record
with the set the failure prints, and say in docs/modellink.md (or the CLI's page) what it means.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _flags(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    out = set()
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out |= _flags(sub, f"{prefix}{name} ")
        else:
            out |= {prefix + o for o in a.option_strings if o not in ("-h", "--help")}
    return out


def accepted_flags(script: str) -> set[str]:
    """Every option string the script's parser accepts (``sub --flag`` for subcommands): the
    parser is captured at its ``parse_args`` / ``parse_known_args`` call, nothing runs."""
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(f"frozen_{script}", ROOT / "scripts" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def capture(self, *a, **k):
        raise _Captured(self)
    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    try:
        mod.main([])
    except _Captured as c:
        return _flags(c.parser)
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    raise AssertionError(f"{script}.py: main([]) did not parse arguments")


RECORD = {
    'pretrain': {
        '--accumulate-allreduce-grads-in-fp32', '--adam-beta1', '--adam-beta2', '--adam-eps', '--add-qkv-bias',
        '--attention-dropout', '--attention-softmax-in-fp32', '--bf16', '--clip-grad', '--data-path', '--debug',
        '--device',
        '--disable-bias-linear', '--distributed-backend', '--distributed-timeout-minutes',
        '--enable-high-availability', '--enable-optimizer-state-local-copy', '--eval-interval', '--eval-iters',
        '--expert-model-parallel-size', '--ffn-hidden-size', '--finetune', '--fp16', '--global-batch-size',
        '--group-query-attention', '--hf-config', '--hidden-dropout', '--hidden-size', '--init-method-std',
        '--initial-loss-scale', '--integrity-check', '--integrity-checksum', '--integrity-max-redo',
        '--is-instruction-dataset', '--jit-compile', '--load', '--load-hf', '--load-if-exists', '--local-rank',
        '--local_rank',
        '--log-interval', '--lora-alpha', '--lora-dropout', '--lora-load', '--lora-r', '--lora-target-modules',
        '--loss-scale-window', '--lr', '--lr-decay-iters', '--lr-decay-style', '--lr-warmup-fraction',
        '--lr-warmup-iters', '--make-vocab-size-divisible-by', '--max-nonfinite-steps', '--max-position-embeddings',
        '--metrics-file',
        '--micro-batch-size', '--min-lr', '--mock-data', '--model', '--moe-aux-loss-coeff',
        '--moe-expert-capacity-factor', '--moe-grouped-gemm', '--moe-pad-expert-input-to-capacity',
        '--moe-router-topk', '--moe-token-drop-policy', '--moe-z-loss-coeff', '--no-gradient-accumulation-fusion',
        '--no-load-optim', '--no-load-rng', '--no-masked-softmax-fusion', '--no-progress', '--no-verify-checksums',
        '--norm-epsilon',
        '--normalization', '--num-attention-heads', '--num-experts', '--num-layer-list', '--num-layers',
        '--num-layers-per-virtual-pipeline-stage', '--num-query-groups', '--overlap-grad-reduce',
        '--padded-vocab-size', '--peak-tflops', '--pipeline-model-parallel-size', '--pipeline-schedule',
        '--position-embedding-type', '--profile', '--profile-level', '--profile-ranks', '--profile-record-shapes',
        '--profile-save-path', '--profile-step-end', '--profile-step-start', '--profile-with-cpu',
        '--profile-with-memory', '--profile-with-stack', '--recompute-granularity', '--recompute-method',
        '--recompute-num-layers', '--rotary-base', '--save', '--save-interval', '--seed', '--seq-length',
        '--sequence-parallel', '--split', '--swiglu', '--tensor-model-parallel-size', '--tokenizer-model',
        '--tokenizer-name-or-path', '--tokenizer-not-use-fast', '--tokenizer-type', '--train-iters',
        '--untie-embeddings-and-output-weights', '--use-deter-comp', '--use-distributed-optimizer',
        '--use-flash-attn', '--use-fused-rmsnorm', '--use-fused-rotary-pos-emb', '--use-fused-swiglu', '--use-mc2',
        '--use-rotary-position-embeddings', '--vocab-size', '--weight-decay',
    },
    'finetune': {
        'merge --debug', 'merge --dtype', 'merge --load-hf', 'merge --lora-load', 'merge --save', 'train --debug',
        'train --accumulate-allreduce-grads-in-fp32', 'train --adam-beta1', 'train --adam-beta2', 'train --adam-eps',
        'train --attention-dropout', 'train --attention-softmax-in-fp32', 'train --bf16', 'train --clip-grad',
        'train --data-path', 'train --data-style', 'train --device', 'train --distributed-backend',
        'train --distributed-timeout-minutes', 'train --enable-high-availability',
        'train --enable-optimizer-state-local-copy', 'train --eval-interval', 'train --eval-iters',
        'train --eval-samples', 'train --expert-model-parallel-size', 'train --fp16', 'train --global-batch-size',
        'train --hidden-dropout', 'train --initial-loss-scale', 'train --integrity-check',
        'train --integrity-checksum', 'train --integrity-max-redo', 'train --jit-compile', 'train --load-hf',
        'train --local-rank', 'train --local_rank', 'train --log-interval', 'train --lora-alpha',
        'train --lora-dropout', 'train --lora-load', 'train --lora-r', 'train --lora-target-modules',
        'train --loss-scale-window', 'train --lr', 'train --lr-decay-iters', 'train --lr-decay-style',
        'train --lr-warmup-fraction', 'train --lr-warmup-iters', 'train --map-keys', 'train --max-nonfinite-steps',
        'train --max-samples',
        'train --metrics-file', 'train --micro-batch-size', 'train --min-lr', 'train --moe-aux-loss-coeff',
        'train --moe-expert-capacity-factor', 'train --moe-grouped-gemm', 'train --moe-pad-expert-input-to-capacity',
        'train --moe-router-topk', 'train --moe-token-drop-policy', 'train --moe-z-loss-coeff',
        'train --no-gradient-accumulation-fusion', 'train --no-masked-softmax-fusion', 'train --no-progress',
        'train --num-experts', 'train --num-layer-list', 'train --num-layers-per-virtual-pipeline-stage',
        'train --overlap-grad-reduce', 'train --peak-tflops', 'train --pipeline-model-parallel-size',
        'train --pipeline-schedule', 'train --profile', 'train --profile-level', 'train --profile-ranks',
        'train --profile-record-shapes', 'train --profile-save-path', 'train --profile-step-end',
        'train --profile-step-start', 'train --profile-with-cpu', 'train --profile-with-memory',
        'train --profile-with-stack', 'train --prompt-type', 'train --recompute', 'train --save',
        'train --save-interval', 'train --seed', 'train --seq-length', 'train --sequence-parallel',
        'train --tensor-model-parallel-size', 'train --tokenizer-model', 'train --tokenizer-name-or-path',
        'train --tokenizer-not-use-fast', 'train --tokenizer-type', 'train --train-iters', 'train --use-deter-comp',
        'train --use-distributed-optimizer', 'train --use-flash-attn', 'train --use-fused-rmsnorm',
        'train --use-fused-rotary-pos-emb', 'train --use-fused-swiglu', 'train --use-mc2', 'train --weight-decay',
    },
    'preprocess_data': {
        '--append-eod', '--bos', '--cache-dir', '--chunk-size', '--handler-name', '--input', '--json-keys',
        '--keep-newlines', '--log-interval', '--map-keys', '--n-subs', '--no-progress', '--output-prefix',
        '--overwrite-cache', '--pack', '--prompt-type', '--seq-length', '--split-sentences', '--streaming',
        '--strict', '--subset-index', '--task-bytes', '--tokenizer-model', '--tokenizer-name-or-path',
        '--tokenizer-not-use-fast', '--tokenizer-type', '--workers',
    },
    'generate': {
        '--attention-softmax-in-fp32', '--bf16', '--device', '--disable-bias-linear', '--early-stopping',
        '--exit-on-missing-checkpoint', '--ffn-hidden-size', '--fp16', '--frequency-penalty', '--global-batch-size',
        '--group-query-attention', '--hidden-size', '--inference-prompt-type', '--input-file', '--length-penalty',
        '--load', '--load-hf', '--local-rank', '--local_rank', '--lora-alpha', '--lora-load', '--lora-merge',
        '--lora-r', '--lora-target-modules', '--make-vocab-size-divisible-by', '--max-length', '--max-new-tokens',
        '--max-position-embeddings', '--micro-batch-size', '--min-p', '--no-gradient-accumulation-fusion',
        '--no-load-optim', '--no-load-rng', '--no-masked-softmax-fusion', '--no-stream', '--normalization',
        '--num-attention-heads', '--num-beams', '--num-layers', '--num-query-groups', '--num-return-sequences',
        '--output-file', '--pipeline-model-parallel-size', '--position-embedding-type', '--presence-penalty',
        '--prompt', '--prompt-type', '--repetition-penalty', '--seed', '--seq-length', '--sequence-parallel',
        '--stop', '--swiglu', '--system', '--task', '--temperature', '--tensor-model-parallel-size',
        '--tokenizer-model', '--tokenizer-name-or-path', '--tokenizer-not-use-fast', '--tokenizer-type', '--top-k',
        '--top-p', '--untie-embeddings-and-output-weights', '--use-flash-attn', '--use-fused-rmsnorm',
        '--use-fused-rotary-pos-emb', '--use-fused-swiglu', '--use-mc2', '--vocab-size',
    },
    'chat': {
        '--attention-softmax-in-fp32', '--bf16', '--device', '--disable-bias-linear', '--early-stopping',
        '--exit-on-missing-checkpoint', '--ffn-hidden-size', '--fp16', '--frequency-penalty', '--global-batch-size',
        '--group-query-attention', '--hidden-size', '--inference-prompt-type', '--length-penalty', '--load',
        '--load-hf', '--local-rank', '--local_rank', '--lora-alpha', '--lora-load', '--lora-merge', '--lora-r',
        '--lora-target-modules', '--make-vocab-size-divisible-by', '--max-length', '--max-new-tokens',
        '--max-position-embeddings', '--micro-batch-size', '--min-p', '--no-gradient-accumulation-fusion',
        '--no-load-optim', '--no-load-rng', '--no-masked-softmax-fusion', '--normalization', '--num-attention-heads',
        '--num-beams', '--num-layers', '--num-query-groups', '--pipeline-model-parallel-size',
        '--position-embedding-type', '--presence-penalty', '--prompt-type', '--repetition-penalty', '--seed',
        '--seq-length', '--sequence-parallel', '--stop', '--swiglu', '--system', '--temperature',
        '--tensor-model-parallel-size', '--tokenizer-model', '--tokenizer-name-or-path', '--tokenizer-not-use-fast',
        '--tokenizer-type', '--top-k', '--top-p', '--untie-embeddings-and-output-weights', '--use-flash-attn',
        '--use-fused-rmsnorm', '--use-fused-rotary-pos-emb', '--use-fused-swiglu', '--use-mc2', '--vocab-size',
    },
    'evaluate': {
        '--allow-unsandboxed', '--bf16', '--device', '--disable-bias-linear', '--evaluation-batch-size',
        '--exit-on-missing-checkpoint', '--ffn-hidden-size', '--fp16', '--group-query-attention', '--hidden-size',
        '--load', '--load-hf', '--local-rank', '--local_rank', '--lora-load', '--make-vocab-size-divisible-by',
        '--max-eval-samples', '--max-new-tokens', '--max-position-embeddings', '--micro-batch-size',
        '--no-load-optim', '--no-load-rng', '--no-masked-softmax-fusion', '--no-progress', '--normalization',
        '--num-attention-heads', '--num-fewshot', '--num-layers', '--num-query-groups', '--num-samples-per-task',
        '--pass-k', '--pipeline-model-parallel-size', '--position-embedding-type', '--prompt-type', '--results-file',
        '--samples', '--sandbox-memory-mb', '--sandbox-timeout', '--scoring', '--seed', '--seq-length', '--swiglu',
        '--task', '--task-data-path', '--temperature', '--tensor-model-parallel-size', '--tokenizer-model',
        '--tokenizer-name-or-path', '--tokenizer-not-use-fast', '--tokenizer-type', '--top-p',
        '--untie-embeddings-and-output-weights', '--use-flash-attn', '--use-fused-rmsnorm',
        '--use-fused-rotary-pos-emb', '--use-fused-swiglu', '--use-mc2',
    },
    'convert_ckpt': {
        '--load-dir', '--loader', '--lora-alpha', '--lora-load', '--lora-r', '--lora-target-modules', '--model-type',
        '--model-type-hf', '--num-layer-list', '--num-layers-per-virtual-pipeline-stage', '--params-dtype',
        '--save-dir', '--save-model-type', '--saver', '--target-pipeline-parallel-size',
        '--target-tensor-parallel-size', '--tokenizer-model',
    },
    'serve': {
        '--attention-softmax-in-fp32', '--bf16', '--default-max-tokens', '--device', '--disable-bias-linear',
        '--exit-on-missing-checkpoint', '--ffn-hidden-size', '--fp16', '--global-batch-size',
        '--group-query-attention', '--hidden-size', '--host', '--load', '--load-hf', '--local-rank', '--local_rank',
        '--lora-alpha', '--lora-load', '--lora-merge', '--lora-r', '--lora-target-modules',
        '--make-vocab-size-divisible-by', '--max-batch', '--max-position-embeddings', '--micro-batch-size',
        '--no-gradient-accumulation-fusion', '--no-load-optim', '--no-load-rng', '--no-masked-softmax-fusion',
        '--normalization', '--num-attention-heads', '--num-layers', '--num-query-groups',
        '--pipeline-model-parallel-size', '--port', '--position-embedding-type', '--prompt-type', '--seq-length',
        '--sequence-parallel', '--served-model-name', '--swiglu', '--tensor-model-parallel-size', '--tokenizer-model',
        '--tokenizer-name-or-path', '--tokenizer-not-use-fast', '--tokenizer-type',
        '--untie-embeddings-and-output-weights', '--use-flash-attn', '--use-fused-rmsnorm',
        '--use-fused-rotary-pos-emb', '--use-fused-swiglu', '--use-mc2', '--vocab-size',
    },
}


@pytest.mark.parametrize("script", ["pretrain", "finetune", "preprocess_data", "generate", "chat", "evaluate",
                                    "convert_ckpt", "serve"])
def test_accepted_flags_are_frozen(script):
    got = accepted_flags(script)
    want = RECORD[script]
    added, removed = sorted(got - want), sorted(want - got)
    assert not added and not removed, (
        f"scripts/{script}.py flags changed: added {added}, removed {removed}. If intended, update RECORD[{script!r}] "
        f"in tests/test_cli_flags.py and document the flag:\n{sorted(got)}")

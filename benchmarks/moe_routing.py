"""MoE layer forward + backward: pmodel's sorted grouped computation vs transformers'
``MixtralSparseMoeBlock`` (loop over experts), same weights, same input, run alternately in one
process (CPU fp32 by default).

    OMP_NUM_THREADS=1 python benchmarks/moe_routing.py --tokens 2048 --hidden 256 --ffn 512 --experts 8 --top-k 2
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    import transformers
    from pmodel import ops
    from pmodel.model import Context, ModelConfig, _moe

    hf_cfg = transformers.MixtralConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_local_experts=a.experts,
                                        num_experts_per_tok=a.top_k)
    torch.manual_seed(0)
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(hf_cfg).float()
    for p_ in block.parameters():
        torch.nn.init.normal_(p_, std=0.05)
    F = a.ffn
    gu = block.experts.gate_up_proj.detach()
    p = {"router": {"weight": block.gate.weight.detach().clone().requires_grad_()},
         "experts": {"gate_proj": gu[:, :F].clone().requires_grad_(), "up_proj": gu[:, F:].clone().requires_grad_(),
                     "down_proj": block.experts.down_proj.detach().clone().requires_grad_()}}
    cfg = ModelConfig(vocab_size=8, hidden_size=a.hidden, num_layers=1, num_heads=1, ffn_hidden_size=F,
                      num_experts=a.experts, moe_top_k=a.top_k)
    x = torch.randn(1, a.tokens, a.hidden)
    ctx = Context(positions=torch.zeros(1, a.tokens, dtype=torch.long))

    def ours():
        xi = x.clone().requires_grad_()
        out, _ = _moe(cfg, p, xi, ctx, ops.Kernels())
        out.sum().backward()
        return out

    def theirs():
        xi = x.clone().requires_grad_()
        out = block(xi)
        out.sum().backward()
        return out

    torch.testing.assert_close(ours(), theirs(), rtol=1e-4, atol=1e-5)
    t_ours, t_hf = [], []
    for _ in range(a.repeats):
        for fn, acc in ((ours, t_ours), (theirs, t_hf)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    mo, mh = statistics.median(t_ours), statistics.median(t_hf)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    print(f"tokens={a.tokens} hidden={a.hidden} ffn={F} experts={a.experts} top_k={a.top_k}")
    print(f"pmodel fwd+bwd median {mo * 1e3:.1f} ms ({a.tokens / mo:.0f} tokens/s); "
          f"transformers {mh * 1e3:.1f} ms ({a.tokens / mh:.0f} tokens/s); speedup {mh / mo:.2f}x")


if __name__ == "__main__":
    main()

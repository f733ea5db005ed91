"""CPU stand-ins for the torch_npu ops pmodel lowers to (tests only).

Registered under the real ``npu`` namespace and op names with the documented schemas and
semantics, so ``pmodel.ops.npu`` runs unchanged on CPU. They are installed only when the real
torch_npu is absent, and only by the tests that ask for them. ``CALLS`` counts how often each
stand-in ran, so a test can tell which implementation a policy selected.

MC2 (``npu_all_gather_base_mm``, ``npu_mm_reduce_scatter_base``) takes the HCCL communicator
*name* of a process group (``hcom``). pmodel obtains it the documented torch_npu way,
``group._get_backend(device).get_hccl_comm_name(global_rank)``. :func:`hccl_group` satisfies
that on CPU without patching anything: it registers a torch.distributed backend
(``Backend.register_backend``) whose process-group backend is gloo plus a
``get_hccl_comm_name`` method, and records name -> group, so the stand-in kernels run their
collectives with gloo on the group the name stands for. They check the kernels' documented
constraints (2-D inputs, matching ``k`` in [256, 65535), ``world_size`` equal to the group size
and in {2, 4, 8, 16, 32}, ``m`` divisible by ``world_size`` for the reduce-scatter, only
``gather_index=0`` / ``comm_turn=0`` / ``reduce_op='sum'``, no bias), except the dtype: the real
kernels take only fp16 / bf16, the stand-ins any float dtype so tests can compare in float64.
"""
from __future__ import annotations

import collections
import itertools

import torch
import torch.nn.functional as F

CALLS: collections.Counter = collections.Counter()

SCHEMAS = {
    "npu_rms_norm": "npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",
    "npu_swiglu": "npu_swiglu(Tensor self, int dim=-1) -> Tensor",
    "npu_rotary_mul": "npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half') -> Tensor",
    "npu_fusion_attention": (
        "npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, "
        "Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., "
        "float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, "
        "int[]? prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, "
        "bool gen_mask_parallel=True, bool sync=False) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)"),
    # op-plugin's current schemas (older torch_npu lacks the scale / dtype / comm_mode arguments;
    # pmodel passes none of them).
    "npu_all_gather_base_mm": (
        "npu_all_gather_base_mm(Tensor self, Tensor x2, str hcom, int world_size, *, Tensor? bias=None, "
        "Tensor? x1_scale=None, Tensor? x2_scale=None, int gather_index=0, bool gather_output=True, "
        "int comm_turn=0, ScalarType? output_dtype=None, str? comm_mode=None) -> (Tensor, Tensor)"),
    "npu_mm_reduce_scatter_base": (
        "npu_mm_reduce_scatter_base(Tensor self, Tensor x2, str hcom, int world_size, *, str reduce_op='sum', "
        "Tensor? bias=None, Tensor? x1_scale=None, Tensor? x2_scale=None, int comm_turn=0, "
        "ScalarType? output_dtype=None, str? comm_mode=None) -> Tensor"),
}


def _rms_norm(x, gamma, epsilon=1e-6):
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
    return (x.float() * rstd).to(x.dtype) * gamma, rstd


def _swiglu(x, dim=-1):
    a, b = x.chunk(2, dim=dim)
    return F.silu(a) * b


def _rotary_mul(x, r1, r2, rotary_mode="half"):
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, -1)
        rot = torch.cat((-x2, x1), -1)
    elif rotary_mode == "interleave":
        rot = torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
    else:
        raise ValueError(rotary_mode)
    return x * r1 + rot * r2


def _fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                      atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                      next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                      actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
    assert input_layout == "BSND", input_layout
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, N, S, D)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)).float() * scale
    if pse is not None:
        s = s + pse.float()
    T, S = q.shape[2], k.shape[2]
    if sparse_mode == 2:  # causal, lower-right aligned; atten_mask is the compressed 2048 triangle
        masked = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
    elif sparse_mode == 0:
        masked = atten_mask
    else:
        raise NotImplementedError(f"stand-in sparse_mode {sparse_mode}")
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    out = (s.softmax(-1).to(v.dtype) @ v).transpose(1, 2)
    z = torch.zeros(1, dtype=torch.float32)
    return out.contiguous(), z, z, z, 0, 0, 0


# ----------------------------------------------------------------------------- MC2
_GROUPS: dict = {}  # hcom name -> ProcessGroup
_BACKENDS: list = []  # keep the Python backend objects alive (their type carries get_hccl_comm_name)
_NAMES = itertools.count()
_BACKEND_NAME = "hccl_standin"


def _check_mc2(name, a, b, hcom, world_size, bias, comm_turn):
    import torch.distributed as dist

    if a.dim() != 2 or b.dim() != 2:
        raise RuntimeError(f"{name}: inputs must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[0]:
        raise RuntimeError(f"{name}: k mismatch {tuple(a.shape)} @ {tuple(b.shape)}")
    if not 256 <= a.shape[1] < 65535:
        raise RuntimeError(f"{name}: k = {a.shape[1]} outside [256, 65535)")
    if not a.is_contiguous():
        raise RuntimeError(f"{name}: self must not be a transposed (non-contiguous) tensor")
    if hcom not in _GROUPS:
        raise RuntimeError(f"{name}: unknown hcom {hcom!r}")
    group = _GROUPS[hcom]
    if world_size not in (2, 4, 8, 16, 32) or world_size != dist.get_world_size(group):
        raise RuntimeError(f"{name}: world_size {world_size} (group has {dist.get_world_size(group)})")
    if bias is not None or comm_turn != 0:
        raise RuntimeError(f"{name}: bias and comm_turn != 0 are not supported")
    return group


def _all_gather_base_mm(x1, x2, hcom, world_size, *, bias=None, x1_scale=None, x2_scale=None, gather_index=0,
                        gather_output=True, comm_turn=0, output_dtype=None, comm_mode=None):
    import torch.distributed as dist

    group = _check_mc2("npu_all_gather_base_mm", x1, x2, hcom, world_size, bias, comm_turn)
    if gather_index != 0 or x1_scale is not None or x2_scale is not None:
        raise RuntimeError("npu_all_gather_base_mm: only gather_index=0 without quantisation")
    gathered = x1.new_empty((world_size * x1.shape[0], x1.shape[1]))
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(gathered, x1, group=group)
    out = gathered @ x2
    return out, (gathered if gather_output else x1.new_empty(0))


def _mm_reduce_scatter_base(x1, x2, hcom, world_size, *, reduce_op="sum", bias=None, x1_scale=None, x2_scale=None,
                            comm_turn=0, output_dtype=None, comm_mode=None):
    import torch.distributed as dist

    group = _check_mc2("npu_mm_reduce_scatter_base", x1, x2, hcom, world_size, bias, comm_turn)
    if reduce_op != "sum" or x1_scale is not None or x2_scale is not None:
        raise RuntimeError("npu_mm_reduce_scatter_base: only reduce_op='sum' without quantisation")
    if x1.shape[0] % world_size:
        raise RuntimeError(f"npu_mm_reduce_scatter_base: m = {x1.shape[0]} not divisible by {world_size}")
    full = (x1 @ x2).contiguous()
    out = full.new_empty((x1.shape[0] // world_size, full.shape[1]))
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, full, group=group)
    return out


def _register_backend():
    import torch.distributed as dist

    if _BACKEND_NAME in dist.Backend.backend_list:
        return

    class HcclStandin(dist.ProcessGroupGloo):
        """gloo, plus the communicator name the MC2 kernels take."""

        def get_hccl_comm_name(self, rank: int) -> str:
            return self.hcom

    def create(store, rank, size, timeout):
        backend = HcclStandin(store, rank, size, timeout)
        backend.hcom = f"hccl_standin_{next(_NAMES)}"
        _BACKENDS.append(backend)
        return backend

    dist.Backend.register_backend(_BACKEND_NAME, create, devices=["cpu"])


def hccl_group(ranks):
    """A process group over ``ranks`` whose CPU backend answers ``get_hccl_comm_name`` and whose
    name the MC2 stand-ins resolve (call on every rank, like ``dist.new_group``)."""
    import torch.distributed as dist

    _register_backend()
    group = dist.new_group(list(ranks), backend=_BACKEND_NAME)
    if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
        _GROUPS[group._get_backend(torch.device("cpu")).get_hccl_comm_name(dist.get_rank())] = group
    return group


# ----------------------------------------------------------------------------- MoE (torch_npu 2.1+ docs)
MOE_SCHEMAS = {
    "npu_moe_init_routing": ("npu_moe_init_routing(Tensor x, Tensor row_idx, Tensor expert_idx, int active_num) "
                             "-> (Tensor, Tensor, Tensor)"),
    "npu_moe_compute_expert_tokens": ("npu_moe_compute_expert_tokens(Tensor sorted_expert_for_source_row, "
                                      "int num_expert) -> Tensor"),
    "npu_grouped_matmul": (
        "npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, "
        "Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, "
        "Tensor[]? per_token_scale=None, Tensor? group_list=None, Tensor[]? activation_input=None, "
        "Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, "
        "int? group_type=None, int? group_list_type=0, int? act_type=0, ScalarType? output_dtype=None) -> Tensor[]"),
    "npu_moe_finalize_routing": (
        "npu_moe_finalize_routing(Tensor expanded_permuted_rows, Tensor? skip1, Tensor? skip2, Tensor? bias, "
        "Tensor? scales, Tensor expanded_src_to_dst_row, Tensor? export_for_source_row, int? drop_pad_mode=0) -> Tensor"),
}


def _moe_init_routing(x, row_idx, expert_idx, active_num):
    """Pairs sorted by expert (ties by the row_idx value); expanded_x[d] = x[src % N];
    expanded_row_idx[src] = d (source -> destination)."""
    assert x.dim() == 2 and row_idx.shape == expert_idx.shape and expert_idx.dim() == 2
    assert row_idx.dtype == torch.int32 and expert_idx.dtype == torch.int32
    N, k = expert_idx.shape
    assert active_num >= N  # pmodel keeps every row active
    src = row_idx.reshape(-1).long()
    key = expert_idx.reshape(-1).long() * (N * k) + src
    order = torch.argsort(key)
    sorted_src = src[order]
    src_to_dst = torch.empty(N * k, dtype=torch.int32)
    src_to_dst[sorted_src] = torch.arange(N * k, dtype=torch.int32)
    return x[sorted_src % N].clone(), src_to_dst, expert_idx.reshape(-1)[order].clone()


def _moe_compute_expert_tokens(sorted_expert, num_expert):
    assert bool((sorted_expert[1:] >= sorted_expert[:-1]).all()), "experts must be sorted"
    return torch.searchsorted(sorted_expert.long(), torch.arange(num_expert), right=True).to(torch.int32)


def _grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                    per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                    activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                    output_dtype=None):
    # the single-tensor form pmodel uses: x=[(M, K)], weight=[(E, K, N)], cumulative group_list (E,)
    assert len(x) == 1 and len(weight) == 1 and split_item in (2, 3) and group_type == 0 and group_list_type == 0
    assert bias is None and scale is None and act_type == 0 and group_list is not None
    xs, w = x[0], weight[0]
    assert xs.dim() == 2 and w.dim() == 3 and w.shape[1] == xs.shape[1] and group_list.numel() == w.shape[0]
    ends = group_list.long().tolist()
    assert ends == sorted(ends) and ends[-1] == xs.shape[0], (ends, xs.shape)
    starts = [0] + ends[:-1]
    return [torch.cat([xs[a:b] @ w[e] for e, (a, b) in enumerate(zip(starts, ends))], 0)]


def _moe_finalize_routing(rows, skip1, skip2, bias, scales, src_to_dst, experts, drop_pad_mode=0):
    assert drop_pad_mode == 0
    N, k = scales.shape
    dst = src_to_dst.long().view(k, N).t()                      # (N, k)
    picked = rows[dst]                                           # (N, k, H)
    if bias is not None:
        picked = picked + bias[experts.long()]
    out = (picked * scales.unsqueeze(-1)).sum(1)
    for s in (skip1, skip2):
        if s is not None:
            out = out + s
    return out


def _counted(name, fn):
    def run(*args, **kwargs):
        CALLS[name] += 1
        return fn(*args, **kwargs)
    return run


IMPLS = {"npu_rms_norm": _rms_norm, "npu_swiglu": _swiglu, "npu_rotary_mul": _rotary_mul,
         "npu_fusion_attention": _fusion_attention, "npu_all_gather_base_mm": _all_gather_base_mm,
         "npu_mm_reduce_scatter_base": _mm_reduce_scatter_base,
         "npu_moe_init_routing": _moe_init_routing, "npu_moe_compute_expert_tokens": _moe_compute_expert_tokens,
         "npu_grouped_matmul": _grouped_matmul, "npu_moe_finalize_routing": _moe_finalize_routing}
SCHEMAS.update(MOE_SCHEMAS)


def install():
    """Register the stand-ins (idempotent); returns the Library handle (keep it alive)."""
    if hasattr(torch.ops, "npu") and hasattr(torch.ops.npu, "npu_rms_norm"):
        try:
            torch.ops.npu.npu_rms_norm.default
            return None
        except (AttributeError, RuntimeError):
            pass
    lib = torch.library.Library("npu", "DEF")
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, _counted(name, IMPLS[name]), "CompositeImplicitAutograd")
    return lib

"""The ``Kernels`` policy: which backend and which fusions an op call may use.

Passed explicitly (the model holds one); there are no module-level switches. Every field changes
which implementation :mod:`pmodel.ops` dispatches to (``pmodel.ops.implementation`` answers
which one without running it), and :func:`kernels_for` turns a run's requests into a policy,
refusing any fusion the chosen backend does not have instead of ignoring it.
"""
from __future__ import annotations

import dataclasses

import torch

BACKENDS = ("reference", "cuda", "npu")

# Which Kernels fields select a fused implementation on which backend. This is a fact about the
# lowering modules (ops/reference.py, ops/cuda.py, ops/npu.py, ops/mc2.py); a test checks that
# pmodel.ops.implementation agrees with it. fused_cross_entropy is backend-independent pure torch.
FUSED_FIELDS = ("fused_norm", "fused_swiglu", "fused_rotary", "fused_attention", "mc2", "fused_moe")
# torch._grouped_mm (one grouped GEMM for all experts) exists from torch 2.8 on; a build without
# it has no fused MoE matmul on CUDA (a fact about the installed torch, fixed at import).
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
AVAILABLE: dict[str, frozenset[str]] = {
    # SDPA is torch's fused attention (flash kernel on CPU where it applies); nothing else fuses.
    "reference": frozenset({"fused_attention"}),
    # F.rms_norm (one fused kernel) and SDPA (flash / memory-efficient / cuDNN).
    # torch._grouped_mm for the experts' matmuls (when the build has it).
    "cuda": frozenset({"fused_norm", "fused_attention"} | ({"fused_moe"} if HAS_GROUPED_MM else set())),
    # torch_npu: npu_rms_norm, npu_swiglu, npu_rotary_mul, npu_fusion_attention,
    # npu_all_gather_base_mm / npu_mm_reduce_scatter_base (MC2), npu_moe_init_routing /
    # npu_grouped_matmul / npu_moe_finalize_routing (MoE).
    "npu": frozenset({"fused_norm", "fused_swiglu", "fused_rotary", "fused_attention", "mc2", "fused_moe"}),
}

_WHAT = {"fused_norm": "fused RMSNorm kernel", "fused_swiglu": "fused SwiGLU kernel",
         "fused_rotary": "fused rotary-embedding kernel", "fused_attention": "fused (flash) attention kernel",
         "mc2": "MC2 kernels (fused all-gather+matmul / matmul+reduce-scatter; torch_npu only)",
         "fused_moe": "grouped-GEMM MoE kernels (torch._grouped_mm on CUDA, npu_grouped_matmul and the MoE routing ops "
                      "on NPU)"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kernels:
    """Kernel policy.

    Each ``fused_*`` / ``mc2`` field is "use the backend's fused kernel for this op when the
    backend has one"; False always selects the unfused implementation, even where a fused kernel
    exists. What each backend has is :data:`AVAILABLE`; on a backend without the kernel the field
    selects nothing different (use :func:`kernels_for` to refuse such a request up front).

    Attributes:
      backend: force a backend (``"reference"``, ``"cuda"``, ``"npu"``); None picks it from the
        tensor's device type (cuda -> cuda, npu -> npu, anything else -> reference).
      fused_cross_entropy: chunked fused output-projection + cross-entropy in ``Model.loss``
        (every backend; False materialises the full logits).
      fused_norm: ``rms_norm`` -> ``F.rms_norm`` (CUDA) / ``npu_rms_norm`` (NPU); False: the
        reference fp32 torch composition.
      fused_swiglu: ``swiglu`` -> ``npu_swiglu`` (NPU); False: ``silu(g) * u``.
      fused_rotary: ``rotary`` -> ``npu_rotary_mul`` (NPU); False: the reference rotation.
      fused_attention: ``attention`` -> SDPA (reference / CUDA: torch picks flash, memory
        efficient or cuDNN) / ``npu_fusion_attention`` (NPU); False: materialised scores with an
        fp32 softmax (:func:`pmodel.ops.reference.attention_math`, Megatron's unfused path).
      mc2: ``all_gather_linear`` / ``linear_reduce_scatter`` (sequence-parallel TP linears) ->
        ``npu_all_gather_base_mm`` / ``npu_mm_reduce_scatter_base`` (NPU); False: the collective
        and the matmul as two steps. Off by default (ModelLink's ``--use-mc2`` is opt-in).
      fused_moe: MoE layers' ``moe_dispatch`` / ``grouped_linear`` / ``moe_combine`` ->
        ``torch._grouped_mm`` for the expert matmuls (CUDA, when the build has it and the widths
        are 16-byte aligned) / ``npu_moe_init_routing`` + ``npu_moe_compute_expert_tokens``,
        ``npu_grouped_matmul``, ``npu_moe_finalize_routing`` (NPU); False: the reference sort,
        per-expert matmuls and scatter (Megatron's ``--moe-grouped-gemm`` off).
    """

    backend: str | None = None
    fused_cross_entropy: bool = True
    fused_norm: bool = True
    fused_swiglu: bool = True
    fused_rotary: bool = True
    fused_attention: bool = True
    mc2: bool = False
    fused_moe: bool = True

    def __post_init__(self):
        if self.backend not in (None, *BACKENDS):
            raise ValueError(f"Kernels.backend must be None, 'reference', 'cuda' or 'npu', got {self.backend!r}")

    def replace(self, **kw) -> "Kernels":
        return dataclasses.replace(self, **kw)


DEFAULT = Kernels()


class KernelUnavailable(ValueError):
    """A requested fusion does not exist on the chosen backend.

    Attributes:
      problems: ``[(argument, reason), ...]`` in :func:`kernels_for` argument names.
      backend: the backend asked for.
    """

    def __init__(self, backend: str, problems: list[tuple[str, str]]):
        self.backend, self.problems = backend, problems
        super().__init__("; ".join(f"{arg}=True: {why}" for arg, why in problems))


def backend_for_device(device) -> str:
    """The backend ``pmodel.ops`` uses for tensors on ``device`` (a ``torch.device`` or a
    device-type string): ``cuda``, ``npu``, or ``reference`` for everything else."""
    kind = device if isinstance(device, str) else device.type
    kind = kind.split(":")[0]
    return kind if kind in ("cuda", "npu") else "reference"


# kernels_for argument -> Kernels field. The argument names follow ModelLink's flags:
# --use-flash-attn, --use-fused-rmsnorm, --use-fused-swiglu, --use-fused-rotary-pos-emb, --use-mc2.
ARG_FIELDS = {"flash_attn": "fused_attention", "fused_rmsnorm": "fused_norm", "fused_swiglu": "fused_swiglu",
              "fused_rotary": "fused_rotary", "mc2": "mc2", "grouped_gemm": "fused_moe"}


def kernels_for(*, backend: str, flash_attn: bool | None = None, fused_rmsnorm: bool | None = None,
                fused_swiglu: bool | None = None, fused_rotary: bool | None = None, mc2: bool | None = None,
                fused_cross_entropy: bool = True, grouped_gemm: bool | None = None) -> Kernels:
    """The policy for a run on ``backend``, refusing fusions the backend does not have.

    Args:
      backend: ``"reference"``, ``"cuda"``, ``"npu"``, or a device type (``"cpu"`` ->
        reference, see :func:`backend_for_device`).
      flash_attn, fused_rmsnorm, fused_swiglu, fused_rotary, mc2: True = use the fused kernel
        (refused with :class:`KernelUnavailable` if ``backend`` has none); False = use the
        unfused implementation; None = the default: on where the backend has the kernel, except
        ``mc2``, which is off unless asked for.
      fused_cross_entropy: the chunked linear + cross-entropy (available everywhere).
      grouped_gemm: the MoE kernels (``Kernels.fused_moe``; ModelLink's ``--moe-grouped-gemm``),
        as the fused flags above.

    Returns:
      ``Kernels(backend=<resolved backend>, ...)`` whose fused fields are True exactly where the
      fused kernel will run.

    Raises:
      KernelUnavailable (a ValueError): naming each argument set to True whose kernel the backend
      lacks, and why.
    """
    b = backend if backend in BACKENDS else backend_for_device(backend)
    asked = {"flash_attn": flash_attn, "fused_rmsnorm": fused_rmsnorm, "fused_swiglu": fused_swiglu,
             "fused_rotary": fused_rotary, "mc2": mc2, "grouped_gemm": grouped_gemm}
    fields, problems = {}, []
    for arg, want in asked.items():
        field = ARG_FIELDS[arg]
        has = field in AVAILABLE[b]
        if want and not has:
            where = sorted(k for k, v in AVAILABLE.items() if field in v)
            problems.append((arg, f"the {b} backend has no {_WHAT[field]} (available on: {', '.join(where)})"))
        fields[field] = has and (want if want is not None else field != "mc2")
    if problems:
        raise KernelUnavailable(b, problems)
    return Kernels(backend=b, fused_cross_entropy=fused_cross_entropy, **fields)

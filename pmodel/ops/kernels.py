"""The ``Kernels`` policy: which backend and which fusions an op call may use.

Passed explicitly (the model holds one); there are no module-level switches.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kernels:
    """Kernel policy.

    Attributes:
      backend: force a backend (``"reference"``, ``"cuda"``, ``"npu"``); None picks it from the
        tensor's device type (cpu -> reference).
      fused_cross_entropy: chunked fused output-projection + cross-entropy in ``Model.loss``.
      fused_norm, fused_swiglu, fused_rotary, fused_attention: use the backend's fused kernel
        for that op when it has one (the reference backend has none and ignores these).
    """

    backend: str | None = None
    fused_cross_entropy: bool = True
    fused_norm: bool = True
    fused_swiglu: bool = True
    fused_rotary: bool = True
    fused_attention: bool = True

    def __post_init__(self):
        if self.backend not in (None, "reference", "cuda", "npu"):
            raise ValueError(f"Kernels.backend must be None, 'reference', 'cuda' or 'npu', got {self.backend!r}")

    def replace(self, **kw) -> "Kernels":
        return dataclasses.replace(self, **kw)


DEFAULT = Kernels()

"""Parallelism as transforms: the device mesh, autograd-aware collectives, tensor / sequence
parallel, data parallel with bucketed gradient reduction, and the sharded (ZeRO-1) optimizer.

Everything takes a :class:`Mesh` explicitly; nothing here reads the environment.
"""
from .data import DataParallel, bucket_layout
from .memory import bytes_per_param, estimate, measured_bytes
from .mesh import DIMS, Mesh, default_backend, init_distributed
from .optimizer import grad_norm
from .pipeline import Pipeline, pipeline
from .plan import ParallelPlan, PipelineSpec, PlanState, parallelize
from .zero import ShardSpec, distributed_optimizer, shard_spec
from .layout import TP_RULES, GradReduction, Layout, Placement, Wrapping, layout_of, shard_params, sync_replicated_grads
from .tensor import ColumnParallel, RowParallel, VocabParallel, tensor_parallel

__all__ = [
    "DIMS", "Mesh", "default_backend", "init_distributed", "DataParallel", "bucket_layout",
    "distributed_optimizer", "shard_spec", "ShardSpec", "grad_norm", "ParallelPlan", "PipelineSpec", "PlanState",
    "parallelize", "Pipeline", "pipeline", "ColumnParallel", "RowParallel",
    "VocabParallel", "shard_params", "sync_replicated_grads", "tensor_parallel", "layout_of",
    "Layout", "Placement", "Wrapping", "GradReduction", "TP_RULES",
    "bytes_per_param", "estimate", "measured_bytes",
]

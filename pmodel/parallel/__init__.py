"""Parallelism as transforms: the device mesh, autograd-aware collectives, tensor / sequence
parallel, data parallel with bucketed gradient reduction, and the sharded (ZeRO-1) optimizer.

Everything takes a :class:`Mesh` explicitly; nothing here reads the environment.
"""
from .data import DataParallel, bucket_layout
from .memory import bytes_per_param, estimate, measured_bytes
from .mesh import DIMS, Mesh, default_backend, init_distributed
from .optimizer import distributed_optimizer, grad_norm
from .plan import ParallelPlan, parallelize, pipeline_grad_norm, pipeline_train_step
from .tensor import (ColumnParallel, RowParallel, VocabParallel, shard_params, sync_replicated_grads,
                     sync_sequence_parallel_grads, tensor_parallel, tp_layout)

__all__ = [
    "DIMS", "Mesh", "default_backend", "init_distributed", "DataParallel", "bucket_layout",
    "distributed_optimizer", "grad_norm", "ParallelPlan", "parallelize", "ColumnParallel", "RowParallel",
    "VocabParallel", "shard_params", "sync_replicated_grads", "sync_sequence_parallel_grads", "tensor_parallel", "tp_layout",
    "bytes_per_param", "estimate", "measured_bytes",
]

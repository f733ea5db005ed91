"""Optimizers in the optax style: ``GradientTransformation(init, update)`` composed with
``chain`` / ``masked`` / ``multi_transform``; ``apply_updates`` changes params in place.

Example::

    tx = optim.chain(optim.clip_by_global_norm(1.0),
                     optim.adamw(optim.megatron(lr=3e-4, min_lr=3e-5, warmup_steps=100,
                                                decay_steps=10_000, style="cosine"),
                                 weight_decay=0.1))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    optim.apply_updates(params, updates)
"""
from .accumulate import AccumulateState, accumulate
from .base import (Assign, EmptyState, GradientTransformation, apply_updates, chain, find_states, global_norm,
                   identity, masked, multi_transform, trainable_mask, tree_map, weight_decay_mask)
from .schedules import STYLES, constant, linear_warmup, megatron
from .transforms import (ClipState, ScaleByAdamState, ScaleByScheduleState, TraceState, add_decayed_weights, adamw,
                         clip_by_global_norm, current_lr, scale_by_adam, scale_by_learning_rate, sgd, trace)

__all__ = [
    "GradientTransformation", "Assign", "EmptyState", "identity", "chain", "masked", "multi_transform",
    "apply_updates", "global_norm", "tree_map", "trainable_mask", "weight_decay_mask", "find_states",
    "constant", "linear_warmup", "megatron", "STYLES", "scale_by_adam", "add_decayed_weights",
    "scale_by_learning_rate", "trace", "clip_by_global_norm", "adamw", "sgd", "current_lr",
    "ScaleByAdamState", "ScaleByScheduleState", "TraceState", "ClipState", "accumulate", "AccumulateState",
]

"""Data-parallel learning over torch.distributed (any backend: gloo on CPU, NCCL on GPUs).

Every rank holds what learning needs (base, task vectors, streamed blocks) and the same coefficient
table; a step's loss is a sum of per-task terms, so the tasks are dealt round-robin over the ranks
(`Step.owns`), each rank backpropagates its own, and the table's gradient — [groups, K], small — is
summed with one all-reduce before the optimiser step. Terms counted once (a regulariser) run on rank 0
(`Step.lead`). Samplers still draw every task's batch on every rank, so the batch streams and thus the
coefficients are those of one process (tests/merge_ops/test_learned_stream.py, 2 gloo processes).

Why data parallel and not FSDP2/pipeline here: the learned state is a few thousand coefficients,
so replicating it costs nothing, and with block streaming (streaming.py) a rank's device holds one
block's merged weights at a time; the part that grows with the model is the stored task vectors,
which streaming may keep off-device. A model whose single block does not fit one device is out of
scope (not implemented: see benchmarks/README.md).
"""

from __future__ import annotations

import torch


def rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_grad(raw: torch.Tensor, loss: float) -> float:
    """Sum the table's gradient and the step's loss over the ranks (no-op in one process)."""
    _, world = rank_world()
    if world == 1:
        return loss
    dist = torch.distributed
    if raw.grad is None:
        raw.grad = torch.zeros_like(raw)
    dist.all_reduce(raw.grad, op=dist.ReduceOp.SUM)
    t = torch.tensor([loss], dtype=torch.float64, device=raw.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t)

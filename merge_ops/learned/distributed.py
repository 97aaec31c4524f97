"""Data-parallel learning over torch.distributed (any backend: gloo on CPU, NCCL on GPUs).

Every rank holds what learning needs (streamed: the file-backed inputs and a few blocks; in memory:
θ₀ and τ) and the same coefficient table; a step's loss is a sum of per-task terms, so the tasks are
dealt round-robin over the ranks (`Step.owns`), each rank backpropagates its own, and the table's
gradient — [groups, K], small — is summed with one all-reduce before the optimiser step. Terms counted
once (a regulariser) run on rank 0 (`Step.lead`). Samplers still draw every task's batch on every
rank, so the batch streams and thus the coefficients are those of one process
(tests/merge_ops/test_learned_stream.py and test_learned_launch.py, 2 gloo processes). launch.py
starts the ranks of one job from the worker (one per GPU it owns).

A model that does not fit one device: we place it by blocks *in time*, not across devices. Block
streaming (streaming.py, store.py) keeps θ₀'s blocks and the experts in the checkpoint files and
brings one unit (a transformer block, or the embedding / head) at a time to the device, with the next
prefetched; the device's share is bounded by the biggest unit, not the depth, so any model whose
biggest block fits a device learns on one, and every rank of a data-parallel group does the same.
Against the two alternatives the issue names:
  - FSDP2 shards parameters across ranks and all-gathers each block before use. Here the learned
    state is a few thousand coefficients and θ₀/τ are frozen and already on disk, so FSDP2 would
    only replace a host→device copy per block by an all-gather of the same bytes, and it would
    need all of θ₀ and K× τ resident across the group (the sum of the ranks' memory), which is what
    streaming avoids; it also cannot shard the K experts' tensors, which are not module parameters.
  - Pipeline by blocks puts consecutive blocks on different devices: every device then holds its
    blocks' K + 1 copies for the whole run, and with one micro-batch per task the stages idle
    (bubble ≈ (P − 1)/P); data parallel over tasks keeps every device busy instead.
A model whose single block does not fit one device is out of scope (not implemented: such a block
would need tensor parallelism). Throughput with 2+ GPUs has not been measured (no GPU here).
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

"""The one place where the optimizer talks to ``torch.distributed``.

BPGrad's step size uses the loss *value*, which under data parallelism is rank-local: each rank
sees its own minibatch. If every rank used its own loss, the replicas would take different steps
and drift apart silently (the pitfall of every published Polyak-type optimizer). One scalar
all-reduce of the loss per step fixes it. The gradient norm needs nothing under DDP (gradients are
already averaged), but sharded gradients (DTensor, as produced by FSDP2's ``fully_shard``) hold only
a shard per rank, so their squared norms must be summed over the shards' process group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _world_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def reduce_loss(loss: torch.Tensor, setting: bool | Any) -> torch.Tensor:
    """Mean of ``loss`` over the ranks of the process group selected by ``setting``.

    ``setting`` is the optimizer's ``distributed_loss`` option: ``False`` keeps the local value,
    ``True`` reduces over the default group, anything else is taken to be a process group.
    Returns a new tensor (the caller's loss is never modified). Gloo has no AVG, so this sums and
    divides; the division is exact for power-of-two world sizes and within one rounding otherwise.
    """
    if setting is False:
        return loss
    group = None if setting is True else setting
    world = _world_size(group)
    if world <= 1:
        return loss
    reduced = loss.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced / world


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def squared_norm(grads: list[torch.Tensor], device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """Sum of squared entries of all ``grads`` as a 0-dim tensor on ``device``.

    One ``_foreach_norm`` per (device, dtype) bucket, no host sync. Sharded DTensor gradients
    contribute their local shard and the partial sums are all-reduced over the mesh's group, so
    the result is the norm of the full, unsharded gradient on every rank. Replicated DTensor
    gradients are counted once (their local tensor is the full tensor).
    """
    total = torch.zeros((), device=device, dtype=dtype)
    plain: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    sharded: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        if _is_dtensor(g):
            placements = g.placements  # type: ignore[attr-defined]
            shard_dims = tuple(i for i, p in enumerate(placements) if p.is_shard())
            if shard_dims:
                key = (g.device_mesh, shard_dims)  # type: ignore[attr-defined]
                sharded.setdefault(key, []).append(g.to_local())  # type: ignore[attr-defined]
                continue
            g = g.to_local()  # type: ignore[attr-defined]
        plain.setdefault((g.device, g.dtype), []).append(g)
    for (dev, _), bucket in plain.items():
        norms = torch._foreach_norm(bucket, 2, dtype=dtype)
        part = torch.stack(list(norms)).square().sum()
        total = total + (part if dev == device else part.to(device, non_blocking=True))
    for (mesh, shard_dims), bucket in sharded.items():
        norms = torch._foreach_norm(bucket, 2, dtype=dtype)
        part = torch.stack(list(norms)).square().sum()
        # Sum the shards over every mesh dimension the gradients are sharded on; replicated
        # dimensions already hold identical partial sums.
        for mesh_dim in shard_dims:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=mesh.get_group(mesh_dim))
        total = total + part.to(device, non_blocking=True)
    return total

"""Run by tests/test_optax.py in its own process: XLA_FLAGS gives it 4 CPU devices.

BPGrad under jit on parameters sharded over 4 devices against the same run on one device; prints
one JSON line.
"""

from __future__ import annotations

import json

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from bpgrad.optax import bpgrad  # noqa: E402


def main() -> None:
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    spec = {"w": PartitionSpec("data"), "b": PartitionSpec("data"), "s": PartitionSpec()}
    rng = np.random.default_rng(0)
    shapes = {"w": (8, 3), "b": (16,), "s": ()}
    init = {k: rng.standard_normal(s) for k, s in shapes.items()}
    stream = [({k: rng.standard_normal(s) for k, s in shapes.items()}, 0.1 + rng.random())
              for _ in range(6)]
    tx = bpgrad(lipschitz="auto", weight_decay=1e-2, objective="epoch_mean")
    step = jax.jit(lambda g, st, p, v: tx.update(g, st, p, value=v))

    def run(place: object) -> tuple[dict, bool]:
        params = {k: place(jnp.asarray(v), k) for k, v in init.items()}  # type: ignore[operator]
        state = tx.init(params)
        keeps = True
        for g, loss in stream:
            grads = {k: place(jnp.asarray(v), k) for k, v in g.items()}  # type: ignore[operator]
            updates, state = step(grads, state, params, loss)
            keeps &= all(updates[k].sharding.is_equivalent_to(params[k].sharding, params[k].ndim)
                         for k in shapes)
            params = optax.apply_updates(params, updates)
        return params, keeps

    sharded, keeps = run(lambda x, k: jax.device_put(x, NamedSharding(mesh, spec[k])))
    n_sharded = sum(len(sharded[k].sharding.device_set) == 4
                    and not sharded[k].sharding.is_fully_replicated for k in shapes)
    cache = step._cache_size()
    single, _ = run(lambda x, k: jax.device_put(x, devices[0]))
    diff = max(float(np.max(np.abs(np.asarray(sharded[k]) - np.asarray(single[k]))))
               for k in shapes)
    print(json.dumps({"devices": len(devices), "sharded_leaves": n_sharded, "max_diff": diff,
                      "cache_size": cache, "updates_keep_sharding": bool(keeps)}))


if __name__ == "__main__":
    main()

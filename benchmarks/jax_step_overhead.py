"""The jitted cost of one bpgrad.optax step against optax.sgd (momentum 0.9) and optax.adam.

Measured side by side in one run (the machines are shared and noisy, so only ratios from the same
run are comparable): each optimizer's whole update (``tx.update`` and ``optax.apply_updates``) is
one jitted function with the parameters and the state donated, as in a training loop. Per round,
every optimizer in turn runs ``--warmup`` steps and then ``--steps`` timed steps (each waited
for); the reported time is the median over ``--rounds`` interleaved rounds of the per-round
medians, and the ratio is against ``optax.sgd`` with momentum from the same run.

    python benchmarks/jax_step_overhead.py                 # CPU, 1 thread, both parameter sets
    python benchmarks/jax_step_overhead.py --weight-decay 0

Weight decay, when not 0, is applied by every optimizer: BPGrad's own (divided by the gradient
norm), ``optax.add_decayed_weights`` before SGD and Adam. Parameter sets as in
benchmarks/step_overhead.py: DeepOBS 2c2d (3.27 M parameters, 8 arrays) and ResNet-18 (11.7 M,
62 arrays), float32.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _single_thread() -> None:
    # Must be set before jax is imported.
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--sets", default="2c2d,resnet18")
    parser.add_argument("--threads", type=int, default=1,
                        help="1 pins XLA's CPU backend to one thread; 0 leaves it alone")
    args = parser.parse_args()
    if args.threads == 1:
        _single_thread()

    import jax
    import jax.numpy as jnp
    import optax

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step_overhead import shapes_2c2d, shapes_resnet18

    from bpgrad.optax import bpgrad

    wd = args.weight_decay

    def decayed(tx: optax.GradientTransformation) -> optax.GradientTransformation:
        return optax.chain(optax.add_decayed_weights(wd), tx) if wd else tx

    optimizers: dict[str, Callable[[], Any]] = {
        "bpgrad (L=50, matconvnet)": lambda: bpgrad(50.0, weight_decay=wd),
        "bpgrad (L=auto)": lambda: bpgrad("auto", weight_decay=wd),
        "bpgrad (port style)": lambda: bpgrad(50.0, weight_decay=wd, momentum_style="port"),
        "optax.sgd(momentum=0.9)": lambda: decayed(optax.sgd(0.01, momentum=0.9)),
        "optax.adam": lambda: decayed(optax.adam(1e-3)),
    }
    sets = {"2c2d 3.27M": shapes_2c2d(), "ResNet-18 11.7M": shapes_resnet18()}
    chosen = [k for k in sets if k.split()[0].lower().replace("-", "") in args.sets.lower()
              .replace("-", "")]

    print(f"jax {jax.__version__}, optax {optax.__version__}, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"weight_decay={wd}, {args.rounds} rounds x {args.steps} steps")
    for set_name in chosen:
        shapes = sets[set_name]
        keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
        base = [0.05 * jax.random.normal(keys[i], s, jnp.float32) for i, s in enumerate(shapes)]
        grads = [jax.random.normal(keys[len(shapes) + i], s, jnp.float32)
                 for i, s in enumerate(shapes)]
        loss = jnp.asarray(1.0, jnp.float32)
        runs = {}
        for name, make in optimizers.items():
            # Plain optax transformations take no `value`: the wrapper gives all the same call.
            tx = optax.with_extra_args_support(make())
            fn = jax.jit(functools.partial(_step, tx, optax.apply_updates), donate_argnums=(0, 1))
            params = [jnp.array(b) for b in base]
            runs[name] = [fn, params, tx.init(params)]
        medians: dict[str, list[float]] = {name: [] for name in optimizers}
        for _ in range(args.rounds):
            for name, run in runs.items():
                fn, params, state = run
                times = []
                for i in range(args.warmup + args.steps):
                    start = time.perf_counter()
                    params, state = fn(params, state, grads, loss)
                    jax.block_until_ready(params)
                    if i >= args.warmup:
                        times.append(time.perf_counter() - start)
                run[1], run[2] = params, state
                medians[name].append(statistics.median(times))
        ref = statistics.median(medians["optax.sgd(momentum=0.9)"])
        print(f"\n{set_name} ({len(shapes)} arrays), per-round medians in ms")
        print("| optimizer | step | vs optax.sgd(momentum) | rounds |")
        print("|---|---|---|---|")
        for name, values in medians.items():
            med = statistics.median(values)
            rounds = ", ".join(f"{1e3 * v:.2f}" for v in values)
            print(f"| {name} | {1e3 * med:.3f} ms | {med / ref:.2f}x | {rounds} |")


def _step(tx: Any, apply: Callable[..., Any], params: Any, state: Any, grads: Any,
          loss: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params, value=loss)
    return apply(params, updates), state


if __name__ == "__main__":
    main()

"""The jitted cost of one bpgrad.optax step against optax.sgd (momentum 0.9) and optax.adam.

Measured side by side in one run (the machines are shared and noisy, so only ratios from the same
run are comparable): each optimizer's whole update (``tx.update`` and ``optax.apply_updates``) is
one jitted function with the parameters and the state donated, as in a training loop. In each of
``--rounds`` rounds the optimizers take turns step by step (``--warmup`` untimed, then ``--steps``
timed, each waited for), so that all of them see the same load; reported are the median over
rounds of each round's median step and of its ratio to ``optax.sgd`` with momentum.

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

REF = "optax.sgd(momentum=0.9)"


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
    parser.add_argument("--rounds", type=int, default=5)
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
        REF: lambda: decayed(optax.sgd(0.01, momentum=0.9)),
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
        ratios: dict[str, list[float]] = {name: [] for name in optimizers}
        for _ in range(args.rounds):
            times: dict[str, list[float]] = {name: [] for name in optimizers}
            # Step by step in turn, so that every optimizer sees the same load on a shared
            # machine; the first --warmup steps of each round are not timed.
            for i in range(args.warmup + args.steps):
                for name, run in runs.items():
                    fn, params, state = run
                    start = time.perf_counter()
                    params, state = fn(params, state, grads, loss)
                    jax.block_until_ready((params, state))
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - start)
                    run[1], run[2] = params, state
            ref_round = statistics.median(times[REF])
            for name in optimizers:
                medians[name].append(statistics.median(times[name]))
                ratios[name].append(medians[name][-1] / ref_round)
        print(f"\n{set_name} ({len(shapes)} arrays): median over rounds of the per-round median "
              f"step, and of the per-round ratio")
        print(f"| optimizer | step | vs {REF} | per-round ratios |")
        print("|---|---|---|---|")
        for name in optimizers:
            rounds = ", ".join(f"{r:.2f}" for r in ratios[name])
            print(f"| {name} | {1e3 * statistics.median(medians[name]):.3f} ms | "
                  f"{statistics.median(ratios[name]):.2f}x | {rounds} |")

def _step(tx: Any, apply: Callable[..., Any], params: Any, state: Any, grads: Any,
          loss: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params, value=loss)
    return apply(params, updates), state


if __name__ == "__main__":
    main()

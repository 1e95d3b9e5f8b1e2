"""bpgrad: BPGrad (Zhang, Wu, Wang, CVPR 2018) as a PyTorch optimizer, a branch-and-prune global
minimizer, and a comparison harness."""

from __future__ import annotations

from bpgrad.globalopt import OptimizeResult, minimize

# set_loss finds the BPGrad inside trainers' optimizer wrappers; bpgrad.integrations imports no
# training framework.
from bpgrad.integrations._core import set_loss
from bpgrad.optim import BPGrad, BPGradError, MissingLossError, bpgrad, estimate_lipschitz

__version__ = "0.1.0"

__all__ = [
    "BPGrad",
    "BPGradError",
    "MissingLossError",
    "OptimizeResult",
    "__version__",
    "bpgrad",
    "estimate_lipschitz",
    "minimize",
    "set_loss",
]

"""bpgrad: BPGrad (Zhang, Wu, Wang, CVPR 2018) as a PyTorch optimizer, a branch-and-prune global
minimizer, and a comparison harness."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

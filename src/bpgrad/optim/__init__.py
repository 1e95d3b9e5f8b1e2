"""The BPGrad optimizer for PyTorch."""

from bpgrad.optim.bpgrad import BPGrad, BPGradError, MissingLossError, bpgrad
from bpgrad.optim.lipschitz import LipschitzEstimate, estimate_lipschitz

__all__ = [
    "BPGrad", "BPGradError", "LipschitzEstimate", "MissingLossError", "bpgrad",
    "estimate_lipschitz",
]

"""The BPGrad optimizer for PyTorch."""

from bpgrad.optim.bpgrad import BPGrad, BPGradError, MissingLossError, bpgrad

__all__ = ["BPGrad", "BPGradError", "MissingLossError", "bpgrad"]

"""The CNL optimizers (``torch.optim.Optimizer`` subclasses)."""
from ._base import CNLOptimizer, CNLStats, ParameterStats
from .adam import FusedCNLAdam
from .adamw import FusedCNLAdamW
from .sgd import FusedCNLSGD

__all__ = ["CNLOptimizer", "CNLStats", "ParameterStats", "FusedCNLAdam", "FusedCNLAdamW", "FusedCNLSGD"]

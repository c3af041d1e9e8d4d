"""cnl_ext: fused Collaborative Neuron Learning (CNL) optimizers for PyTorch.

CNL applies an optimizer's update only to the elements where it agrees in sign with the gradient
of the data the model already masters (the reference), so that data is not forgotten.
"""
from .optim import CNLOptimizer, CNLStats, FusedCNLAdam, FusedCNLAdamW, FusedCNLSGD, ParameterStats

__version__ = "0.1.0"

__all__ = ["CNLOptimizer", "CNLStats", "ParameterStats", "FusedCNLAdam", "FusedCNLAdamW", "FusedCNLSGD", "__version__"]
from .optim.wrapper import CNL  # noqa: E402  (CNL for any torch.optim optimizer)

__all__ += ["CNL"]

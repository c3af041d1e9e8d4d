"""The bench tooling's tests run as tests/ do: without CUDA, Triton's interpreter runs the kernels on CPU
tensors, and it must be chosen before triton is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""luce_cuda: CUDA kernels compiled at run time with NVRTC (cuda-python), selected by capability.

Modules: compile (NVRTC + disk cache), launch (kernels on torch streams), weights (quantized
planes on the GPU), linear / attention (role objects), ops (fused kernels for the model graph),
programs (every kernel program). Importing this package imports neither torch nor CUDA.
"""

"""The one map from luce's float dtype names to torch dtypes (``--dtype``, KV and feature dtypes)."""
from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

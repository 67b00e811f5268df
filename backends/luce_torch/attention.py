"""Reference causal GQA attention over a KV store."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from luce_core.plugin_api import Caps, KVStore, RunConfig, TreeMask


class TorchAttention:
    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None):
        # Row-exact forwards read positions and tree paths on the host, which a CUDA-graph
        # capture forbids, and a graphed decode step takes the masked path over its window: on
        # a GPU this reference promises nothing (chains then verify as graphed decode steps).
        device = config.device if config is not None else "auto"
        self._host_reads = device == "cpu" or (device == "auto" and (caps is None or caps.device == "cpu"))

    def exact_rows(self, m: int) -> bool:
        """Rows given ``positions`` or a ``TreeMask`` are computed one by one over exactly the
        keys a decode step at that position reads (see ``_rows``): exact for any m on the CPU."""
        return self._host_reads

    def forward(self, q: torch.Tensor, kv: KVStore, layer: int, start: int, *,
                scale: float, mask: torch.Tensor | TreeMask | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        T = q.shape[0]
        end = start + T
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        if (isinstance(mask, TreeMask) or (mask is None and positions is not None)) and not capturing:
            return self._rows(q, kv, layer, end, mask, positions, scale)
        if isinstance(mask, TreeMask):
            mask = mask.dense(end)
        if mask is None and positions is not None:
            mask = torch.arange(end, device=q.device)[None, :] <= positions.to(q.device)[:, None]
        k, v = kv.read(layer, end)
        q = kv.rotate_query(q)
        if mask is None and T == 1:
            return _attend(q, k, v, scale)
        if mask is None:
            pos_q = torch.arange(start, end, device=q.device)[:, None]
            mask = torch.arange(end, device=q.device)[None, :] <= pos_q
        return _attend(q, k, v, scale, mask.to(q.device))

    def _rows(self, q: torch.Tensor, kv: KVStore, layer: int, end: int, mask: TreeMask | None,
              positions: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Each row over the keys a one-token decode step at its position reads, in the same
        order and shapes (its path's slots for a tree), so it rounds bit for bit as that step:
        what lossless speculative verification needs."""
        k, v = kv.read(layer, end)
        rows = [kv.rotate_query(q[t:t + 1]) for t in range(q.shape[0])]  # as a decode step rotates its row
        if mask is None:  # chain rows: row t sees slots [0, positions[t]]
            return torch.cat([_attend(r, k[:p + 1], v[:p + 1], scale) for r, p in zip(rows, positions.tolist())])
        start = int(mask.start)
        depth = (mask.positions - start).tolist()
        table = mask.table.to(k.device, torch.long)
        prefix = torch.arange(start, device=k.device)
        out = []
        for t, d in enumerate(depth):
            idx = torch.cat([prefix, table[t, :d + 1]])
            out.append(_attend(rows[t], k[idx], v[idx], scale))
        return torch.cat(out)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] over k, v [L, Hkv, D] (GQA: Hkv divides Hq), in SDPA's [H, T, D] layout;
    kv heads are repeated since SDPA's enable_gqa is not on every build."""
    group = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)
    kh = k.transpose(0, 1).repeat_interleave(group, dim=0).to(q.dtype)
    vh = v.transpose(0, 1).repeat_interleave(group, dim=0).to(q.dtype)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(0, 1)

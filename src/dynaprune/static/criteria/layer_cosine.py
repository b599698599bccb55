"""Layer importance from its input/output hidden states: 1 - cos(input, output) averaged over real
tokens. A block whose output points where its input did changes little and is the first to drop."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scores(model, calib) -> torch.Tensor:
    n = len(model.layers)
    total, count = torch.zeros(n), 0.0
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for i, blk in enumerate(model.layers):
        def hook(module, args, output, i=i):
            seen[i] = 1 - F.cosine_similarity(args[0].float(), output.float(), dim=-1)  # (B, L)
        handles.append(blk.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in calib:
                seen.clear()
                calib.forward(model, batch)
                m = batch.mask.float()
                for i, d in seen.items():
                    total[i] += float((d.cpu() * m).sum())
                count += float(m.sum())
    finally:
        for h in handles:
            h.remove()
    return total / max(count, 1.0)

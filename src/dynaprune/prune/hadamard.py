"""An orthonormal Hadamard rotation of the head dimension before K/V are quantized (QuaRot, Ashkboos et
al. 2024, Sec. 4; QuIP#, Tseng et al. 2024, Sec. 3): a rotation spreads an outlier channel's energy over
every channel, so a per-token group's range is no longer set by one channel.

``H`` is Sylvester's Hadamard matrix over sqrt(d) (d a power of two): symmetric and orthonormal, so
``(x H) H = x``. The cache stores the codes of ``x H``; reading multiplies the dequantized values by ``H``
again. For keys an accelerator would rotate the query instead (``q H . k H = q . k``); for values it
would fold ``H`` into the output projection. Both give the same logits and outputs as reading ``x H H``.
"""

from __future__ import annotations

import functools

import torch

from dynaprune.errors import DynapruneError


@functools.lru_cache(maxsize=8)
def hadamard(d: int) -> torch.Tensor:
    """(d, d) fp32 orthonormal Sylvester-Hadamard matrix; d must be a power of two."""
    if d < 1 or d & (d - 1):
        raise DynapruneError(f"a Hadamard rotation needs a power-of-two head_dim, got {d}")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d**0.5


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x H`` along the last dim, in fp32 (its own inverse: ``rotate(rotate(x)) == x`` up to rounding)."""
    return x.float() @ hadamard(x.shape[-1])

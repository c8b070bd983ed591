"""Feature-map size arithmetic, so heads are sized at construction time instead of from a dummy forward pass
(which would cost a full pass of a 138M-parameter network and put shape logic in the traced graph)."""

from __future__ import annotations


def conv_out(n: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution or (floor-mode) pooling layer along one axis."""
    return (n + 2 * padding - kernel) // stride + 1

"""Confidence intervals for proportions: the one Wilson interval every number with an
interval uses (validation accuracy, the dashboard, gold accuracy of annotators).

    low, high = wilson_interval(7, 10)        # (0.397, 0.892)

Only `math`: importable from anywhere in the library without a circle.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (low, high) for a proportion successes/n (Wilson 1927).

    Unlike the textbook p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and does not
    collapse to a point at 0 or n successes, which matters for small samples (annotators
    in the dashboard, held-out prompts). (nan, nan) when n is 0.
    """
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp away rounding: at 0 successes the low end is exactly 0, at n the high end 1.
    return max(0.0, center - half), min(1.0, center + half)

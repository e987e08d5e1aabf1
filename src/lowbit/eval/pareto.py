"""The Pareto front of (bits, metric) points, both minimised: the runs no other run beats on both axes.

Point p is dominated when some q has b_q ≤ b_p and m_q ≤ m_p with at least one strict. One sweep over
the points sorted by bits: p is on the front iff it has the least metric of its bits value and that
metric is below every metric at strictly fewer bits. Equal points do not dominate each other, so both
stay; a NaN coordinate is never on the front and dominates nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import groupby


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the non-dominated points among `points` = [(bits, metric), ...]."""
    valid = [i for i, (b, m) in enumerate(points) if not (math.isnan(b) or math.isnan(m))]
    order = sorted(valid, key=lambda i: (points[i][0], points[i][1]))
    front, best_below = [], None  # least metric at strictly fewer bits (None: no point there yet)
    for _, same_bits in groupby(order, key=lambda i: points[i][0]):
        idx = list(same_bits)
        least = points[idx[0]][1]  # sorted by metric within equal bits
        if best_below is None or least < best_below:
            front += [i for i in idx if points[i][1] == least]
            best_below = least
    return sorted(front)

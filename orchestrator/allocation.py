"""The damage allocation: a parameter budget spent over the layers where it costs least, from each
layer's measured damage (the ``damage`` stage: KL from the base model with that layer alone pruned
to each width, or dropped), taking the damages of different layers as adding up.

- ``export: stock`` keeps one FF width for every layer (a stock config has one
  ``intermediate_size``), so an allocation is a kept fraction for every layer plus a set of dropped
  layers: for each number of dropped layers, the middle layers whose drop costs least against
  pruning them, and the fraction the rest must keep for the budget; the cheapest over the counts.
  Exact when the layers have one size.
- ``export: tied`` stores each layer's width: a kept fraction per layer from the damage grid (and,
  where allowed, drops), the sum of damages minimised under the budget by dynamic programming over
  the layers (a knapsack in units of the smallest grid step's parameters, removals rounded down so
  the budget holds). Exact on the grid.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Allocation:
    fractions: dict[int, float]  # kept fraction of each pruned layer (layers not listed: untouched)
    dropped: tuple[int, ...]
    damage: float  # predicted: the sum of the layers' measured damages


def damage_at(row: dict[str, Any], grid: list[float], f: float) -> float:
    """A layer's damage at kept fraction ``f``, interpolated linearly on the grid (0 at f = 1)."""
    if f >= 1:
        return 0.0
    d = row["damage"]
    j = bisect.bisect_left(grid, f)
    if j == 0:
        return float(d[0])
    lo, hi = grid[j - 1], grid[j]
    return float(d[j - 1] + (d[j] - d[j - 1]) * (f - lo) / (hi - lo))


def _removed(i: int, f: float, facts: Any, kind: str) -> float:
    return facts.ff_layer_params[i] * (1 - f)


def _drop_saves(i: int, facts: Any, kind: str) -> int:
    return int(facts.layer_params[i] if kind == "params" else facts.ff_layer_params[i])


def stock_allocations(damage: dict[str, Any], facts: Any, remove: int, kind: str,
                      keep_ratio: Any) -> list[Allocation]:
    """The cheapest allocation for every number of dropped layers (0, 1, ...) that meets the
    budget with one kept fraction for the remaining layers; ``keep_ratio(layers, freed)`` is the
    planner's fraction for ``layers`` once ``freed`` is removed by drops. Sorted by damage."""
    grid, rows = damage["fractions"], {r["layer"]: r for r in damage["layers"]}
    n = facts.num_layers
    middle = [i for i in range(1, n - 1)]
    out = []
    for d in range(0, len(middle) + 1):
        ff_rest = sum(facts.ff_layer_params) * (n - d) / n
        need = remove - d * sum(_drop_saves(i, facts, kind) for i in range(n)) / n
        guess = 1 - need / ff_rest if ff_rest else 0.0
        if guess <= 0:
            continue
        # The d middle layers whose drop costs least beyond pruning them to the fraction needed.
        extra = sorted(middle, key=lambda i: rows[i]["kl_drop"] - damage_at(rows[i], grid, min(guess, 1.0)))
        dropped = sorted(extra[:d])
        rest = [i for i in range(n) if i not in dropped]
        ratio = keep_ratio(rest, sum(_drop_saves(i, facts, kind) for i in dropped))
        if ratio is None:
            continue
        cost = sum(rows[i]["kl_drop"] for i in dropped) + sum(damage_at(rows[i], grid, ratio) for i in rest)
        out.append(Allocation({i: ratio for i in rest if ratio < 1}, tuple(dropped), cost))
    return sorted(out, key=lambda a: a.damage)


def free_allocation(damage: dict[str, Any], facts: Any, remove: int, kind: str, drops: bool) -> Allocation | None:
    """Per-layer kept fractions from the grid (and, with ``drops``, dropped middle layers) of least
    total damage that remove at least ``remove``; None if the grid cannot."""
    grid, rows = damage["fractions"], {r["layer"]: r for r in damage["layers"]}
    n = facts.num_layers
    unit = min(facts.ff_layer_params[i] for i in range(n)) / len(grid)
    if unit <= 0 or remove <= 0:
        return Allocation({}, (), 0.0)
    need = math.ceil(remove / unit)
    inf = float("inf")
    # best[r]: the least damage of the layers so far removing at least r units (r capped at need).
    best = [0.0] + [inf] * need
    choice: list[list[tuple[int, str | float]]] = []
    for i in range(n):
        options: list[tuple[int, float, str | float]] = [(0, 0.0, 1.0)]
        for f in grid[:-1]:
            options.append((int(_removed(i, f, facts, kind) // unit), damage_at(rows[i], grid, f), f))
        if drops and 0 < i < n - 1:
            options.append((int(_drop_saves(i, facts, kind) // unit), float(rows[i]["kl_drop"]), "drop"))
        nxt = [inf] * (need + 1)
        back: list[tuple[int, str | float]] = [(0, 1.0)] * (need + 1)
        for r, cost in enumerate(best):
            if cost == inf:
                continue
            for units, dmg, what in options:
                t = min(need, r + units)
                if cost + dmg < nxt[t]:
                    nxt[t], back[t] = cost + dmg, (r, what)
        best = nxt
        choice.append(back)
    if best[need] == inf:
        return None
    fractions: dict[int, float] = {}
    dropped = []
    r = need
    for i in range(n - 1, -1, -1):
        prev, what = choice[i][r]
        if what == "drop":
            dropped.append(i)
        elif isinstance(what, float) and what < 1:
            fractions[i] = what
        r = prev
    return Allocation(dict(sorted(fractions.items())), tuple(sorted(dropped)), best[need])

"""Sparsity schedules as pure formulas."""
from __future__ import annotations

__all__ = ["cubic_sparsity", "cubic_steps"]


def cubic_sparsity(step: int, final: float, initial: float = 0.0, begin: int = 0, end: int = 1, frequency: int = 1) -> float:
    """Zhu & Gupta, "To prune, or not to prune" (ICLR-W 2018), eq. 1:

        s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n Δt))^3   for t in {t_0, t_0+Δt, ..., t_0+nΔt}

    ``begin`` = t_0, ``end`` = t_0 + nΔt, ``frequency`` = Δt (the value is held between pruning steps).
    Before ``begin`` the sparsity is ``initial``; from ``end`` on it is ``final``."""
    if end <= begin:
        return final if step >= begin else initial
    if step < begin:
        return initial
    if step >= end:
        return final
    t = begin + ((step - begin) // frequency) * frequency
    frac = (t - begin) / (end - begin)
    return final + (initial - final) * (1.0 - frac) ** 3


def cubic_steps(final: float, initial: float, begin: int, end: int, frequency: int) -> list[tuple[int, float]]:
    """The (step, sparsity) pairs at which a cubic schedule prunes, ending exactly at ``(end, final)``."""
    pts = [(t, cubic_sparsity(t, final, initial, begin, end, frequency)) for t in range(begin, end, max(1, frequency))]
    pts.append((end, final))
    return pts

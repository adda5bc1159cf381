"""Encoder table: the rounding rule as a few straight lines, exact by construction.

The rule (dist8bit.quant.codebook) is `code = #{j : thresholds[j] < s}`. A
binary search finds that count with 8 dependent table reads: the CPU pays for
them in shuffles and the GPU in shared-memory bank conflicts. The dynamic maps
are made of runs of evenly spaced codes (one run per decade), so over each run
the count is a straight line in s: it jumps by one at each threshold, and the
thresholds are evenly spaced up to float32 rounding. The fast encoder is:

    slot   = max(biased_exponent(|s| * c), 96) - 96    (32 slots: binades of |s| * c)
    piece  = slot_piece[slot] + (|s| > split1[slot]) + (|s| > split2[slot])
    h      = fma(|s|, slope[piece], offset[piece])     (float32)
    r      = h - round_to_nearest_integer(h)
    code   = clamp(trunc(s < 0 ? mirror - h : h), 0, 255)   if |r| >= guard
             the binary search                               otherwise (h is near a jump)

Every table read has at most 32 entries (one vpermt2ps on CPU; 32 words, so no
shared-memory bank conflict on CUDA). The guard keeps the result exact
without needing the lines to hit each threshold to the last ulp: `build` checks,
with exact float32 arithmetic at every point where the count or the piece
changes, that whenever |r| >= guard the code it gives *is* the count. Because
fma rounding is monotone in s, checking the ends of each interval of constant
count proves the whole interval. Slots where no such lines exist read the
search line, h = 0 exactly, which never clears the guard: those values take
the binary search, so the table is only ever a shortcut, never a second rule.
Non-finite s never reaches the table (such blocks take the scalar path).

Negative s: with floor(h) = f the code is mirror - 1 - f, computed as
trunc(mirror - h), which is the same integer whenever h clears the guard
(the float32 subtraction errs by far less than the guard).

Table layout (float32, `TABLE_SIZE` entries; the CPU and CUDA kernels and the
scalar C++ path in csrc/common/code_search.h read it the same way):

    [0, 32)    split1 per slot: |s| above it moves one piece up. Its low 5
               mantissa bits (or a NaN's payload, when the slot has one
               piece) hold the slot's first piece, slot_piece.
    [32, 64)   split2 per slot: |s| above it moves one more piece up (NaN: never)
    [64, 96)   slope per piece
    [96, 128)  offset per piece
    [128]      mirror (negative s: code = trunc(mirror - h))
    [129]      guard
    [130]      slot scale: slots are binades of float32(|s| * scale)
"""

from __future__ import annotations

import bisect
import math
import struct
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

SLOTS = 32
SLOT_BASE_EXPONENT = 96  # slot 0 gathers every |s| below 2^(97 - 127); |s| < 2 fills the rest
LINES = 32
SEARCH_LINE = LINES - 1  # reserved: h = 0 exactly, which never clears the guard: the binary search decides
TABLE_SIZE = 4 * SLOTS + 3
# Candidate slot scales c = 2^(k/16 - 1), in [0.5, 1): slots are binades of |s| * c.
SLOT_SCALES = tuple(float(np.float32(2.0 ** (k / 16 - 1))) for k in range(16))
GUARD = 2.0**-12
MAP_LAST = 255
_PIECE_BITS = 0x1F


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _next_up(x: float) -> float:
    """Next float32 toward +inf (for x >= 0 or x < 0, never NaN)."""
    if x == 0.0:
        return _float(1)
    bits = _bits(x)
    return _float(bits + 1) if x > 0 else _float(bits - 1)


def _next_down(x: float) -> float:
    return -_next_up(-x)


def _round_float32(value: Fraction) -> float:
    """Round a rational to float32, to nearest, ties to even (what fma does)."""
    guess = float(np.float32(float(value)))
    candidates = {guess, _next_up(guess), _next_down(guess)}
    best = min(candidates, key=lambda c: (abs(Fraction(c) - value), _bits(c) & 1))
    return best


def fma32(s: float, slope: float, offset: float) -> float:
    """float32 fma(s, slope, offset), computed exactly then rounded once."""
    return _round_float32(Fraction(s) * Fraction(slope) + Fraction(offset))


@dataclass(frozen=True)
class _Line:
    slope: float
    offset: float


_SEARCH_LINE = _Line(0.0, 0.0)  # not NaN: vrangeps, which folds the guard test, drops NaNs
_MAX_MAGNITUDE = _next_down(2.0)


def _reaches(a: float, scale: float, exponent: int) -> bool:
    """Whether float32(a * scale) >= 2^exponent (the kernels' multiply, rounded once)."""
    return _round_float32(Fraction(a) * Fraction(scale)) >= Fraction(2) ** exponent


def _slot_edge(exponent: int, scale: float) -> float:
    """The smallest float32 a >= 0 with float32(a * scale) >= 2^exponent."""
    a = float(np.float32(2.0**exponent / scale))
    while a > 0.0 and _reaches(_next_down(a), scale, exponent):
        a = _next_down(a)
    while not _reaches(a, scale, exponent):
        a = _next_up(a)
    return a


def _slot_range(slot: int, scale: float) -> tuple[float, float]:
    """Smallest and largest |s| of a slot: slot = max(exponent(float32(|s| * scale)), 96) - 96.

    Slot 0 starts at 0; slot 31 ends at the largest |s| below 2 (scale < 1, so
    |s| * scale stays below 2 and its exponent at most 127).
    """
    low = 0.0 if slot == 0 else _slot_edge(slot + SLOT_BASE_EXPONENT - 127, scale)
    if slot == SLOTS - 1:
        return low, _MAX_MAGNITUDE
    return low, _next_down(_slot_edge(slot + SLOT_BASE_EXPONENT + 1 - 127, scale))


class _Rule:
    """The rounding rule of one map, seen from |s| on each side of zero."""

    def __init__(self, thresholds: list[float], mirror: int) -> None:
        self.thresholds = thresholds
        self.zero = self.count(0.0)  # count at s = +-0 (-0 compares equal to thresholds of +-0)
        self.mirror = mirror  # negative s: code = mirror - 1 - floor(h)

    def count(self, s: float) -> int:
        return bisect.bisect_left(self.thresholds, s)

    def code_from_h(self, h_floor: int, sign: int) -> int:
        """What the kernels return when floor(h) = h_floor and the guard passes."""
        code = h_floor if sign == 0 else self.mirror - 1 - h_floor
        return min(max(code, 0), MAP_LAST)

    def targets(self) -> tuple[np.ndarray, np.ndarray]:
        """Magnitudes where h must cross an integer, and that integer, both sides merged.

        Positive s: the count reaches j + 1 just above threshold j >= 0.
        Negative s: floor(h) = mirror - 1 - code, so crossing |t_j| (t_j < 0),
        where the count drops from j + 1 to j, h reaches mirror - 1 - j.
        """
        points = [(t, j + 1) for j, t in enumerate(self.thresholds) if t >= 0.0]
        points += [(-t, self.mirror - 1 - j) for j, t in enumerate(self.thresholds) if t < 0.0]
        points.sort()
        return np.array([p for p, _ in points], dtype=np.float64), np.array([v for _, v in points], dtype=np.float64)


def _fit_line(points: np.ndarray, targets: np.ndarray, gap: float) -> tuple[_Line, float]:
    """Minimax line through (point, target) in float64, and its largest error.

    Crossings at a single magnitude fix no slope: a gentle one (one count per
    `gap`, the distance to the neighbouring crossings) keeps the line valid on
    both sides.
    """
    if points[-1] == points[0]:
        slope = 1.0 / gap
        return _Line(slope, float(targets.mean() - slope * points[0])), float(targets.max() - targets.min()) / 2
    slope0 = (targets[-1] - targets[0]) / (points[-1] - points[0])
    # The spread max(r) - min(r) of the residuals r = target - k * point is
    # convex in k: search a grid of slopes, then a finer grid around the best.
    low, high = slope0 * 0.8, slope0 * 1.25
    for _ in range(8):
        slopes = np.linspace(low, high, 33)
        residuals = targets[None, :] - slopes[:, None] * points[None, :]
        best = int(np.argmin(residuals.max(axis=1) - residuals.min(axis=1)))
        low, high = slopes[max(best - 1, 0)], slopes[min(best + 1, 32)]
    slope = float(slopes[best])
    r = targets - slope * points
    return _Line(slope, float((r.max() + r.min()) / 2)), float((r.max() - r.min()) / 2)


def _runs(points: np.ndarray, targets: np.ndarray, tolerance: float) -> list[tuple[float, float, _Line]]:
    """Greedy runs of consecutive crossings that one line serves: (first, last magnitude, line)."""
    distinct = np.unique(points)
    gaps = np.diff(distinct)

    def gap_around(start: int, end: int) -> float:
        where = int(np.searchsorted(distinct, points[start]))
        around = gaps[max(where - 1, 0) : where + 1]
        gap = float(around.max()) if around.size else 1.0
        # The last crossing: a line gentle enough to stay valid up to |s| = 2.
        return max(gap, _MAX_MAGNITUDE - float(points[start])) if where == len(distinct) - 1 else gap

    runs = []
    start = 0
    while start < len(points):
        end = start + 1
        while end < len(points) and points[end] == points[start]:
            end += 1
        line, error = _fit_line(points[start:end], targets[start:end], gap_around(start, end))
        while end < len(points) and error <= tolerance:
            stop = end + 1
            while stop < len(points) and points[stop] == points[end]:
                stop += 1
            trial, trial_error = _fit_line(points[start:stop], targets[start:stop], 1.0)
            if trial_error > tolerance:
                break
            line, error, end = trial, trial_error, stop
        line = _Line(float(np.float32(line.slope)), float(np.float32(line.offset)))
        runs.append((float(points[start]), float(points[end - 1]), line))
        start = end
    return runs


def _is_exact(rule: _Rule, line: _Line, low: float, high: float, guard: float) -> bool:
    """Whether every |s| in [low, high], on both sides, that passes the guard gets its true code.

    h = fma(|s|, slope, offset) is monotone in |s|, so checking the two ends
    of every interval of constant count covers the interval.
    """
    if line == _SEARCH_LINE or low > high:
        return True  # h = 0 never passes the guard
    for sign in (0, 1):
        s_low, s_high = (low, high) if sign == 0 else (-high, -low)
        edges = [s_low]
        for t in rule.thresholds[bisect.bisect_left(rule.thresholds, s_low) :]:
            if t >= s_high:
                break
            edges += [t, _next_up(t)]
        edges.append(s_high)
        for u, w in zip(edges[0::2], edges[1::2], strict=True):
            count = rule.count(u)
            h_u = fma32(abs(u), line.slope, line.offset)
            h_w = fma32(abs(w), line.slope, line.offset)
            h_low, h_high = min(h_u, h_w), max(h_u, h_w)
            for h_floor in range(math.floor(h_low), math.floor(h_high) + 1):
                # Some h in [h_low, h_high] with this floor passes the guard
                # (|h - rint(h)| >= guard) only if the band below is reachable.
                passes = max(h_low, h_floor + guard) <= min(h_high, h_floor + 1 - guard)
                if passes and rule.code_from_h(h_floor, sign) != count:
                    return False
    return True


def _with_payload(value: float, payload: int) -> float:
    """`value` with its low 4 mantissa bits replaced by `payload`."""
    return _float((_bits(value) & ~_PIECE_BITS) | payload)


def _nan_with(payload: int) -> float:
    return _float(0x7FC00000 | payload)


def _boundary(rule: _Rule, span: tuple[float, float], lines: tuple[_Line, _Line], guard: float) -> float | None:
    """A magnitude B in [low, high) where lines[0] serves [low, B] and lines[1] (B, high]."""
    low, high = span
    for fraction in (0.5, 0.25, 0.75, 0.125, 0.875, 0.0625, 0.9375, 0.03125, 0.96875, 0.0):
        b = float(np.float32(low + (high - low) * fraction))
        if not (low <= b < high and b > 0.0):
            continue
        if _is_exact(rule, lines[0], low, b, guard) and _is_exact(rule, lines[1], _next_up(b), high, guard):
            return b
    return None


def _constant_or_nan(rule: _Rule, low: float, high: float, guard: float) -> _Line:
    """A line holding the count of a gap on both sides, or the search line where the sides disagree."""
    line = _Line(0.0, rule.count(_next_up(low)) + 0.5)
    return line if _is_exact(rule, line, _next_up(low), high, guard) else _SEARCH_LINE


def _pieces(rule: _Rule, guard: float) -> tuple[list[_Line], list[float]] | None:
    """Lines in magnitude order and the boundaries between them (None: no exact table).

    Piece p serves magnitudes (boundaries[p-1], boundaries[p]]. Where two runs'
    lines cannot meet (the gap of constant count between them is wider than
    either stays valid), a constant line bridges the gap; where even that is
    not exact on both sides, the search line does (those values take the search).
    """
    points, targets = rule.targets()
    runs = _runs(points, targets, tolerance=guard / 4)
    if not (runs and _is_exact(rule, runs[-1][2], runs[-1][1], _MAX_MAGNITUDE, guard)):
        # A constant line serves the magnitudes above the last crossing.
        tail = _Line(0.0, rule.count(_MAX_MAGNITUDE) + 0.5)
        runs.append((_MAX_MAGNITUDE, _MAX_MAGNITUDE, tail))
    first_line = runs[0][2]
    lines = [
        first_line if _is_exact(rule, first_line, 0.0, runs[0][0], guard) else _constant_or_nan(rule, -0.0, runs[0][0], guard)
    ]
    boundaries: list[float] = []
    end = runs[0][1] if lines[0] == first_line else 0.0
    for first, last, line in runs[1:] if lines[0] == first_line else runs:
        b = _boundary(rule, (end, first), (lines[-1], line), guard)
        if b is None:
            bridge = _constant_or_nan(rule, end, first, guard)
            b1 = _boundary(rule, (end, first), (lines[-1], bridge), guard)
            b2 = None if b1 is None else _boundary(rule, (_next_up(b1), first), (bridge, line), guard)
            if b1 is None or b2 is None:
                return None
            boundaries.append(b1)
            lines.append(bridge)
            b = b2
        boundaries.append(b)
        lines.append(line)
        end = last
    return lines, boundaries


def _slot_splits(
    rule: _Rule, lines: list[_Line], boundaries: list[float], slot: int, scale: float, guard: float
) -> tuple[float, float]:
    """split1 (carrying the slot's first piece) and split2 of one slot, checked exactly.

    A slot that cannot be served exactly reads the search line.
    """
    low, high = _slot_range(slot, scale)
    first = sum(1 for b in boundaries if low > b)
    inside = [b for b in boundaries if low <= b < high]
    if len(inside) > 2 or first + len(inside) >= SEARCH_LINE:
        return _nan_with(SEARCH_LINE), _nan_with(0)
    split1 = _with_payload(inside[0], first) if inside else _nan_with(first)
    split2 = inside[1] if len(inside) > 1 else _nan_with(0)
    piece, start = first, low
    for b in (split1, split2):
        if math.isnan(b):
            break
        if not (start <= b <= high and _is_exact(rule, lines[piece], start, b, guard)):
            return _nan_with(SEARCH_LINE), _nan_with(0)
        start, piece = _next_up(b), piece + 1
    if not _is_exact(rule, lines[piece], start, high, guard):
        return _nan_with(SEARCH_LINE), _nan_with(0)
    return split1, split2


def _best_rule(values: list[float], guard: float) -> _Rule:
    """The mirror constant that lines up the two sides' crossings best (fewest runs).

    For a map symmetric about zero it is 2 * count(0) + 1; a map with two
    zero codes (the padded linear map) needs one more.
    """
    zero = bisect.bisect_left(values, 0.0)
    best: tuple[int, _Rule] | None = None
    for mirror in (2 * zero + 1, 2 * zero + 2, 2 * zero, 2 * zero + 3, 2 * zero - 1):
        rule = _Rule(values, mirror)
        runs = len(_runs(*rule.targets(), tolerance=guard / 4))
        if best is None or runs < best[0]:
            best = (runs, rule)
    assert best is not None
    return best[1]


def _best_slot_scale(boundaries: list[float]) -> float:
    """The slot scale that leaves the fewest slots with two split points.

    A slot with at most one split point needs one lookup and one comparison
    fewer (the CPU kernel skips split2 when no slot uses it). Decade
    boundaries put two piece boundaries a factor 1.1-1.8 apart, so where the
    binade edges fall decides; the scale moves them.
    """

    def crowded(scale: float) -> tuple[int, int]:
        edges = [_slot_range(slot, scale)[0] for slot in range(1, SLOTS)]
        per_slot = [0] * SLOTS
        for b in boundaries:
            per_slot[bisect.bisect_right(edges, b)] += 1
        return sum(1 for n in per_slot if n > 2), sum(1 for n in per_slot if n > 1)

    return min(SLOT_SCALES, key=crowded)


@dataclass(frozen=True)
class EncoderTableStats:
    """How much of the magnitude range the table serves without the binary search."""

    lines: int
    fast_slots: int
    max_pieces_per_slot: int


def build_encoder_table(thresholds: torch.Tensor, guard: float = GUARD) -> tuple[torch.Tensor, EncoderTableStats]:
    """The `TABLE_SIZE` float32 encoder table for a codebook's thresholds (see the module doc)."""
    values = [0.0 if float(t) == 0.0 else float(t) for t in thresholds.float().cpu()[:-1]]
    rule = _best_rule(values, guard)
    built = _pieces(rule, guard)
    usable = built is not None and len(built[0]) <= SEARCH_LINE
    lines, boundaries = built if usable else ([], [])
    lines = lines + [_SEARCH_LINE] * (LINES - len(lines))
    scale = _best_slot_scale(boundaries)
    splits = [
        _slot_splits(rule, lines, boundaries, slot, scale, guard) if usable else (_nan_with(SEARCH_LINE), _nan_with(0))
        for slot in range(SLOTS)
    ]
    words = [_bits(s1) for s1, _ in splits] + [_bits(s2) for _, s2 in splits]
    words += [_bits(line.slope) for line in lines] + [_bits(line.offset) for line in lines]
    words += [_bits(float(rule.mirror)), _bits(guard), _bits(scale)]
    table = torch.tensor(np.array(words, dtype=np.uint32).view(np.int32)).view(torch.float32)
    fast = sum(1 for s1, _ in splits if (_bits(s1) & _PIECE_BITS) != SEARCH_LINE)
    pieces = max((1 + sum(1 for s in pair if not math.isnan(s)) for pair in splits), default=1)
    return table, EncoderTableStats(sum(1 for line in lines if line != _SEARCH_LINE), fast, pieces)

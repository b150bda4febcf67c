"""A linear map from one token embedding space to another: ridge least squares in float64.

Given the rows of the tokens two text models share (donor ``X``, recipient ``Y``, float32), a
seeded 10 % of them is held out; the map ``y = W x + b`` is fitted on the rest (``b`` only when
the mmproj's last layer has a bias to carry it; otherwise the fit goes through the origin), with
the ridge strength that gives the smallest squared error on the held-out rows.  The held-out
rows then say how good the map is:

- **top-1 retrieval**: how often a held-out token's mapped row is nearer (by cosine) to its own
  recipient row than to any other held-out recipient row (chance: 1 / held-out);
- **mean cosine** between mapped and true rows, beside the **baseline** of always answering the
  mean recipient row.

Memory: the Gram matrices are accumulated a block of rows at a time (width x width float64),
and retrieval compares a block of mapped rows with the held-out rows normalized in place.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

HELD_OUT_SHARE = 0.1
SEED = 0
#: ridge strengths tried, relative to the mean eigenvalue (trace / width) of the fitted rows' Gram matrix
RIDGE_GRID = tuple(10.0 ** k for k in range(-6, 1))
ROWS_PER_BLOCK = 4096
SCORES_PER_BLOCK = 1 << 23  # similarity values computed at a time for retrieval


@dataclass
class LinearMap:
    """``y = weight @ x + bias`` (weight: out x in, float64)."""

    weight: np.ndarray
    bias: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.weight.T + self.bias


@dataclass
class FitScores:
    shared: int
    fitted: int
    held_out: int
    top1: float
    mean_cosine: float
    baseline_cosine: float
    #: the chosen ridge strength, relative to trace / width of the fitted rows' Gram matrix
    ridge: float
    intercept: bool

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_first(n: int, seed: int = SEED) -> tuple[np.ndarray, int]:
    """A seeded order of ``n`` pairs with the held-out ones first, and how many are held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(n - 1, max(1, round(n * HELD_OUT_SHARE))) if n > 1 else 0
    return np.concatenate([np.sort(order[:n_held]), np.sort(order[n_held:])]), n_held


def _mean(a: np.ndarray) -> np.ndarray:
    total = np.zeros(a.shape[1])
    for s in range(0, len(a), ROWS_PER_BLOCK):
        total += a[s:s + ROWS_PER_BLOCK].sum(0, dtype=np.float64)
    return total / max(len(a), 1)


def _moments(x_rows: np.ndarray, y_rows: np.ndarray, mx: np.ndarray, my: np.ndarray):
    """(XᵀX, XᵀY, ΣY²) of the centred rows, in float64, a block at a time."""
    g = np.zeros((x_rows.shape[1], x_rows.shape[1]))
    c = np.zeros((x_rows.shape[1], y_rows.shape[1]))
    yy = 0.0
    for s in range(0, len(x_rows), ROWS_PER_BLOCK):
        x = x_rows[s:s + ROWS_PER_BLOCK].astype(np.float64) - mx
        y = y_rows[s:s + ROWS_PER_BLOCK].astype(np.float64) - my
        g += x.T @ x
        c += x.T @ y
        yy += float(np.einsum("ij,ij->", y, y))
    return g, c, yy


def _ridge(g: np.ndarray, c: np.ndarray, strength: float) -> np.ndarray:
    a = g.copy()
    a[np.diag_indices_from(a)] += strength
    return np.linalg.solve(a, c)


def _normalized(rows: np.ndarray) -> np.ndarray:
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.float32(1e-30))
    return rows


def fit_map(x: np.ndarray, y: np.ndarray, n_held: int, intercept: bool = True) -> tuple[LinearMap, FitScores]:
    """The map from ``x`` rows to ``y`` rows (float32, paired by row), fitted on rows ``n_held:``,
    chosen and scored on rows ``:n_held``.  ``y``'s held-out rows are normalized in place."""
    held_x, held_y, fit_x, fit_y = x[:n_held], y[:n_held], x[n_held:], y[n_held:]
    mean_y = _mean(fit_y)
    mx = _mean(fit_x) if intercept else np.zeros(x.shape[1])
    my = mean_y if intercept else np.zeros(y.shape[1])
    g, c, _ = _moments(fit_x, fit_y, mx, my)
    gh, ch, yyh = _moments(held_x, held_y, mx, my)
    unit = float(np.trace(g)) / max(g.shape[0], 1) or 1.0
    best = None
    for strength in RIDGE_GRID:
        w = _ridge(g, c, strength * unit)
        err = yyh - 2 * float(np.vdot(w, ch)) + float(np.vdot(w, gh @ w))  # ‖Yh - Xh W‖² without forming Xh W
        if best is None or err < best[0]:
            best = (err, strength, w)
    _, strength, w = best
    linear = LinearMap(w.T.copy(), my - w.T @ mx)
    top1, cosine, baseline = _scores(held_x, held_y, linear, mean_y)
    return linear, FitScores(len(x), len(fit_x), n_held, top1, cosine, baseline, strength, intercept)


def _scores(held_x: np.ndarray, held_y: np.ndarray, linear: LinearMap,
            mean_y: np.ndarray) -> tuple[float, float, float]:
    """(top-1 retrieval, mean cosine, mean-row baseline cosine) on the held-out rows."""
    n = len(held_x)
    if not n:
        return 0.0, 0.0, 0.0
    targets = _normalized(held_y)
    mean_row = (mean_y / max(float(np.linalg.norm(mean_y)), 1e-30)).astype(np.float32)
    baseline = float((targets @ mean_row).mean(dtype=np.float64))
    hits, cos_sum = 0, 0.0
    block = max(1, SCORES_PER_BLOCK // n)
    for s in range(0, n, block):
        mapped = _normalized(linear(held_x[s:s + block]).astype(np.float32))
        similar = mapped @ targets.T
        rows = np.arange(len(mapped))
        cos_sum += float(similar[rows, s + rows].sum(dtype=np.float64))
        hits += int((similar.argmax(1) == s + rows).sum())
    return hits / n, cos_sum / n, baseline

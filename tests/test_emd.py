"""heatmaps.emd: the exact Earth Mover's distance (POT's network simplex)
against a slow reference written here, the dense transportation linear
programme solved by scipy's HiGHS over ALL cells (no shared-mass shortcut),
at 1e-9 relative; known values; custom ground distances; symmetry; the
pivot-limit error."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import sparse
from scipy.optimize import linprog

from tokenreduction.analysis import heatmaps

REL = 1e-9  # POT vs HiGHS measured at ~2e-15 relative on 5x5 to 28x28 random maps


def reference_emd(a: np.ndarray, b: np.ndarray, cost: np.ndarray | None = None) -> float:
    """min sum f_ij c_ij s.t. sum_j f_ij = p_i, sum_i f_ij = q_j, f >= 0, over
    the sum-normalised maps, every cell a source and a sink (dense LP)."""
    h, w = a.shape
    p, q = (a / a.sum()).ravel(), (b / b.sum()).ravel()
    if cost is None:
        r, c = np.divmod(np.arange(h * w), w)
        cost = np.sqrt((r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2)
    n = p.size
    rows = sparse.kron(sparse.eye(n), np.ones((1, n)))
    cols = sparse.kron(np.ones((1, n)), sparse.eye(n))
    res = linprog(
        cost.ravel(), A_eq=sparse.vstack([rows, cols]).tocsr(), b_eq=np.concatenate([p, q]), bounds=(0, None),
        method="highs", options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    assert res.status == 0, res.message
    return float(res.fun)


def token_depth_like(g: np.random.Generator, size: int) -> np.ndarray:
    """A peaked map with exact zeros, as a pruned-token depth map can be."""
    m = np.exp(-((np.arange(size)[:, None] - g.uniform(0, size)) ** 2 + (np.arange(size) - g.uniform(0, size)) ** 2)
               / (2 * (size / 4) ** 2))
    m[g.random((size, size)) < 0.3] = 0
    return m


@pytest.mark.parametrize("size,seed", [(5, 0), (5, 1), (14, 2), (14, 3), (14, 4)])
def test_random_maps_equal_the_dense_lp(size, seed):
    g = np.random.default_rng(seed)
    a, b = g.random((size, size)), g.random((size, size))
    assert heatmaps.emd(a, b) == pytest.approx(reference_emd(a, b), rel=REL)


@pytest.mark.parametrize("seed", [5, 6])
def test_peaked_maps_with_zeros_equal_the_dense_lp(seed):
    g = np.random.default_rng(seed)
    a, b = token_depth_like(g, 14), token_depth_like(g, 14)
    assert (a == 0).any() and (b == 0).any()
    assert heatmaps.emd(a, b) == pytest.approx(reference_emd(a, b), rel=REL)


def test_one_28x28_pair_equals_the_dense_lp():
    # CLCA's map size: 784 x 784 cells, the LP has 614,656 variables (~10 s)
    g = np.random.default_rng(7)
    a, b = g.random((28, 28)), token_depth_like(g, 28)
    assert heatmaps.emd(a, b) == pytest.approx(reference_emd(a, b), rel=REL)


def test_known_distances():
    m = np.zeros((14, 14))
    m[3:9, 4:10] = np.random.default_rng(8).random((6, 6)) + 0.1
    assert heatmaps.emd(m, np.roll(m, 1, axis=1)) == pytest.approx(1.0, rel=REL)  # every unit moved one cell
    assert heatmaps.emd(m, np.roll(m, 1, axis=0)) == pytest.approx(1.0, rel=REL)
    assert heatmaps.emd(m, np.roll(m, (1, 1), axis=(0, 1))) == pytest.approx(math.sqrt(2), rel=REL)  # diagonal
    assert heatmaps.emd(m, np.roll(m, (2, -3), axis=(0, 1))) == pytest.approx(math.hypot(2, 3), rel=REL)
    d1, d2 = np.zeros((28, 28)), np.zeros((28, 28))
    d1[2, 3], d2[27, 0] = 5.0, 0.5  # totals differ: normalised first
    assert heatmaps.emd(d1, d2) == pytest.approx(math.hypot(25, 3), rel=REL)
    # half the mass moves two cells
    h1, h2 = np.zeros((5, 5)), np.zeros((5, 5))
    h1[0, 0] = h1[4, 4] = 1
    h2[0, 0] = h2[4, 2] = 1
    assert heatmaps.emd(h1, h2) == pytest.approx(1.0, rel=REL)


def test_zero_for_identical_and_rescaled_maps():
    m = np.random.default_rng(9).random((28, 28))
    assert heatmaps.emd(m, m) == 0.0
    assert heatmaps.emd(m, 7.5 * m) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("size", [5, 14, 28])
def test_symmetric(size):
    g = np.random.default_rng(10 + size)
    a, b = g.random((size, size)), token_depth_like(g, size)
    assert heatmaps.emd(a, b) == pytest.approx(heatmaps.emd(b, a), rel=REL)
    assert heatmaps.emd(a, b) > 0


def test_custom_ground_distance_is_solved_in_full():
    g = np.random.default_rng(11)
    a, b = g.random((6, 6)), g.random((6, 6))
    r, c = np.divmod(np.arange(36), 6)
    manhattan = np.abs(r[:, None] - r[None, :]) + np.abs(c[:, None] - c[None, :])
    assert heatmaps.emd(a, b, manhattan) == pytest.approx(reference_emd(a, b, manhattan.astype(float)), rel=REL)
    # squared Euclidean is no metric: the shared-mass shortcut would be wrong,
    # the full problem is solved and equals the LP
    squared = heatmaps.grid_distance(6, 6) ** 2
    assert heatmaps.emd(a, b, squared) == pytest.approx(reference_emd(a, b, squared), rel=REL)
    # the default grid distance given explicitly takes the full path: same value as the shortcut
    assert heatmaps.emd(a, b, heatmaps.grid_distance(6, 6)) == pytest.approx(heatmaps.emd(a, b), rel=REL)
    assert heatmaps.emd(a, b, manhattan) > heatmaps.emd(a, b)  # L1 >= L2 per move, strictly on random maps


def test_a_pivot_limit_reached_is_an_error_not_a_value(monkeypatch):
    g = np.random.default_rng(12)
    a, b = g.random((14, 14)), g.random((14, 14))
    monkeypatch.setattr(heatmaps, "EMD_MAX_ITERATIONS", 5)
    with pytest.raises(RuntimeError, match=r"not solved to optimality: numItermax reached.*pivot limit 5"):
        heatmaps.emd(a, b)


@pytest.mark.parametrize(
    "cost,message",
    [
        (np.ones((9, 9)), r"ground_distance must be \(16, 16\), got \(9, 9\)"),
        (-np.ones((16, 16)), "finite and non-negative"),
        (np.full((16, 16), np.nan), "finite and non-negative"),
    ],
)
def test_bad_ground_distance_is_named(cost, message):
    m = np.random.default_rng(13).random((4, 4))
    with pytest.raises(ValueError, match=message):
        heatmaps.emd(m, m + 1, cost)


def test_maps_without_mass_are_refused():
    with pytest.raises(ValueError, match="positive total mass"):
        heatmaps.emd(np.zeros((4, 4)), np.ones((4, 4)))

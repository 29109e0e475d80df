"""heatmaps.emd's exact solvers side by side in one run: the former dense
transportation LP (scipy HiGHS, after the same shared-mass shortcut) vs POT's
network simplex (the current ``heatmaps.emd``), time per pair of 14x14 and
28x28 maps (28x28: CLCA's token-depth maps), their ratio, and the largest
|difference| of the two values.

Maps: half uniform random, half peaked with 30 % exact zeros (as pruned-token
depth maps). POT is imported and warmed up before timing.

    .venv/bin/python benchmarks/emd.py [--pairs-14 10] [--pairs-28 3] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from tokenreduction.analysis import heatmaps


def lp_transport(p: np.ndarray, q: np.ndarray, cost: np.ndarray) -> float:
    """The former solver: min-cost transport p (n,) -> q (m,) as a dense LP."""
    n, m = p.size, q.size
    a_eq = sparse.vstack([sparse.kron(sparse.eye(n), np.ones((1, m))), sparse.kron(np.ones((1, n)), sparse.eye(m))])
    res = linprog(cost.ravel(), A_eq=a_eq.tocsr(), b_eq=np.concatenate([p, q]), bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(res.message)
    return float(res.fun)


def lp_emd(a: np.ndarray, b: np.ndarray) -> float:
    """The former heatmaps.emd: shared mass stays, surplus -> deficit by LP."""
    p, q = (a / a.sum()).ravel(), (b / b.sum()).ravel()
    moved = heatmaps.moved_mass(p, q)
    if moved is None:
        return 0.0
    src, dst, ps, qs, total = moved
    d = heatmaps.grid_distance(*a.shape)
    return total * lp_transport(ps, qs, d[np.ix_(src, dst)])


def maps(g: np.random.Generator, size: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for i in range(count):
        if i % 2 == 0:
            out.append((g.random((size, size)), g.random((size, size))))
        else:
            pair = []
            for _ in range(2):
                r, c = np.arange(size)[:, None], np.arange(size)[None, :]
                m = np.exp(-((r - g.uniform(0, size)) ** 2 + (c - g.uniform(0, size)) ** 2) / (2 * (size / 4) ** 2))
                m[g.random((size, size)) < 0.3] = 0
                pair.append(m)
            out.append(tuple(pair))
    return out


def timed(fn, pairs) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    values = np.array([fn(a, b) for a, b in pairs])
    return (time.perf_counter() - t) / len(pairs), values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs-14", type=int, default=10)
    parser.add_argument("--pairs-28", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = np.random.default_rng(args.seed)
    heatmaps.emd(*maps(g, 5, 1)[0])  # imports POT (and its torch backend) outside the timing
    print(f"{'maps':>6} {'pairs':>5} {'LP s/pair':>10} {'POT s/pair':>11} {'LP/POT':>8} {'max |diff|':>11}")
    for size, count in ((14, args.pairs_14), (28, args.pairs_28)):
        pairs = maps(g, size, count)
        lp_time, lp_values = timed(lp_emd, pairs)
        pot_time, pot_values = timed(heatmaps.emd, pairs)
        print(f"{size:>3}x{size:<2} {count:>5} {lp_time:>10.4f} {pot_time:>11.5f} {lp_time / pot_time:>7.0f}x "
              f"{np.max(np.abs(lp_values - pot_values)):>11.2e}")


if __name__ == "__main__":
    main()

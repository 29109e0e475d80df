"""Analysis metrics of the "Which Tokens to Use?" study against slow, obviously
correct references (explicit formulas, loops, sklearn, scipy)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import linalg, stats
from sklearn import metrics as skm

from tokenreduction.analysis import compare, correlate, heatmaps, patterns, similarity


def rng(seed=0):
    return np.random.default_rng(seed)


def random_orthogonal(d, seed=0):
    q, r = np.linalg.qr(rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------- similarity


def slow_cka_dist(A, B):
    """1 - HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), centred Gram matrices of raw features."""
    n = A.shape[1]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = A.T @ A, B.T @ B
    hsic = lambda X, Y: np.trace(X @ H @ Y @ H)
    return 1 - hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def slow_unbiased_hsic(K, L):
    """U-statistic over ordered 4-tuples of distinct indices (Song et al. 2012)."""
    n = K.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
        count += 1
    return total / count


def test_cka_invariances():
    X = rng(1).normal(size=(6, 30))
    assert similarity.lin_cka_dist(X, X) == pytest.approx(0, abs=1e-12)
    assert similarity.lin_cka_dist(X, random_orthogonal(6) @ X) == pytest.approx(0, abs=1e-12)
    assert similarity.lin_cka_dist(X, 7.5 * X) == pytest.approx(0, abs=1e-12)
    # not invariant to a general linear map: a real distance
    M = rng(2).normal(size=(6, 6))
    assert similarity.lin_cka_dist(X, M @ X) > 1e-3


def test_cka_matches_explicit_formula_both_code_paths():
    A = rng(3).normal(size=(5, 12)) + 1.0
    B = rng(4).normal(size=(4, 12)) + np.vstack([A[:3], A[:1]])
    assert similarity.lin_cka_dist(A, B) == pytest.approx(slow_cka_dist(A, B), abs=1e-12)
    # D > N uses the (N, N) Gram route
    A2, B2 = rng(5).normal(size=(20, 6)), rng(6).normal(size=(15, 6))
    assert similarity.lin_cka_dist(A2, B2) == pytest.approx(slow_cka_dist(A2, B2), abs=1e-12)


def test_debiased_cka_matches_loop_unbiased_hsic():
    A = rng(7).normal(size=(4, 8))
    B = rng(8).normal(size=(3, 8)) + A[:3]
    a, b = similarity.preprocess(A), similarity.preprocess(B)
    K, L = a.T @ a, b.T @ b
    expected = 1 - slow_unbiased_hsic(K, L) / math.sqrt(slow_unbiased_hsic(K, K) * slow_unbiased_hsic(L, L))
    assert similarity.lin_cka_prime_dist(A, B) == pytest.approx(expected, abs=1e-10)
    assert similarity.lin_cka_prime_dist(A, A) == pytest.approx(0, abs=1e-12)
    # the image-space route (D > N) gives the same value
    A2, B2 = rng(9).normal(size=(12, 8)), rng(10).normal(size=(10, 8))
    a2, b2 = similarity.preprocess(A2), similarity.preprocess(B2)
    K2, L2 = a2.T @ a2, b2.T @ b2
    expected2 = 1 - slow_unbiased_hsic(K2, L2) / math.sqrt(slow_unbiased_hsic(K2, K2) * slow_unbiased_hsic(L2, L2))
    assert similarity.lin_cka_prime_dist(A2, B2) == pytest.approx(expected2, abs=1e-10)


def test_cca_correlations_match_covariance_eigenproblem():
    A = rng(11).normal(size=(4, 50))
    B = rng(12).normal(size=(3, 50)) + 0.7 * A[:3]
    a, b = A - A.mean(1, keepdims=True), B - B.mean(1, keepdims=True)
    Saa, Sbb, Sab = a @ a.T, b @ b.T, a @ b.T
    ev = np.sort(np.linalg.eigvals(linalg.solve(Saa, Sab) @ linalg.solve(Sbb, Sab.T)).real)[::-1][:3]
    np.testing.assert_allclose(similarity.cca_correlations(A, B), np.sqrt(ev), atol=1e-10)
    assert similarity.mean_cca_corr(A, B) == pytest.approx(np.sqrt(ev).mean(), abs=1e-10)
    assert similarity.mean_sq_cca_corr(A, B) == pytest.approx(ev.mean(), abs=1e-10)


def test_mean_cca_of_invertible_linear_map_is_one():
    X = rng(13).normal(size=(5, 40))
    M = rng(14).normal(size=(5, 5)) + 3 * np.eye(5)
    assert similarity.mean_cca_corr(X, M @ X) == pytest.approx(1, abs=1e-9)
    assert similarity.mean_sq_cca_corr(X, M @ X) == pytest.approx(1, abs=1e-9)
    # rank-deficient: 8 features spanning 3 directions; correlations counted over the rank
    Z = rng(15).normal(size=(3, 40))
    Xr = rng(16).normal(size=(8, 3)) @ Z
    Yr = rng(17).normal(size=(6, 3)) @ Z
    rho = similarity.cca_correlations(Xr, Yr)
    assert rho.shape == (3,)
    np.testing.assert_allclose(rho, 1, atol=1e-9)


def test_procrustes_rotation_zero_and_matches_scipy():
    X = rng(18).normal(size=(6, 25))
    assert similarity.procrustes_dist(X, random_orthogonal(6, 3) @ X) == pytest.approx(0, abs=1e-10)
    A, B = rng(19).normal(size=(6, 25)), rng(20).normal(size=(6, 25))
    a, b = similarity.preprocess(A), similarity.preprocess(B)
    R, _ = linalg.orthogonal_procrustes(a.T, b.T)  # min ||a^T R - b^T||
    assert similarity.procrustes_dist(A, B) == pytest.approx(np.sum((a.T @ R - b.T) ** 2), abs=1e-10)


def study_pwcca(A, B):
    """The study's eigen-whitening PWCCA, written out (equal widths)."""
    a, b = similarity.preprocess(A), similarity.preprocess(B)
    ea, va = np.linalg.eigh(a @ a.T)
    eb, vb = np.linalg.eigh(b @ b.T)
    wa, wb = va @ np.diag(ea**-0.5) @ va.T, vb @ np.diag(eb**-0.5) @ vb.T
    u, rho, _ = np.linalg.svd(wa @ a @ b.T @ wb)
    weights = np.abs((u.T @ wa @ a) @ a.T).sum(1)
    return 1 - (weights / weights.sum()) @ rho


def test_pwcca():
    X = rng(21).normal(size=(5, 40))
    assert similarity.pwcca_dist(X, X) == pytest.approx(0, abs=1e-10)
    A, B = rng(22).normal(size=(5, 40)), rng(23).normal(size=(5, 40))
    B = B + A[::-1]
    assert similarity.pwcca_dist(A, B) == pytest.approx(study_pwcca(A, B), abs=1e-10)
    assert 0 < similarity.pwcca_dist(A, B) < 1


def test_feature_similarities_dict_and_inputs():
    A = rng(24).normal(size=(6, 30))
    B = rng(25).normal(size=(4, 30)) + A[:4]
    sims = similarity.feature_similarities(A, B)
    assert list(sims) == list(similarity.FEATURE_METRICS)
    assert sims["PWCCA"] == pytest.approx(similarity.pwcca_dist(A, B))
    assert sims["MeanCCA"] == pytest.approx(similarity.mean_cca_corr(A, B))
    assert sims["LinCKA"] == pytest.approx(similarity.lin_cka_dist(A, B))
    assert sims["LinCKAPrime"] == pytest.approx(similarity.lin_cka_prime_dist(A, B))
    assert sims["Procrustes"] == pytest.approx(similarity.procrustes_dist(A, B))
    same = similarity.feature_similarities(A, A)
    for k, v in {"PWCCA": 0, "MeanSqCCA": 1, "MeanCCA": 1, "LinCKA": 0, "LinCKAPrime": 0, "Procrustes": 0}.items():
        assert same[k] == pytest.approx(v, abs=1e-9), k
    # torch bfloat16 / float32 inputs
    t = similarity.feature_similarities(torch.tensor(A).bfloat16(), torch.tensor(A, dtype=torch.float32))
    assert t["LinCKA"] == pytest.approx(0, abs=1e-3)
    # constant representation: undefined, NaN not a crash
    assert all(np.isnan(v) for v in similarity.feature_similarities(np.ones((3, 30)), A).values())
    with pytest.raises(ValueError, match="same images"):
        similarity.lin_cka_dist(A, B[:, :10])
    with pytest.raises(ValueError, match="NaN"):
        similarity.lin_cka_dist(A, np.full_like(A, np.nan))


# ---------------------------------------------------------------- patterns


def test_kept_iou_against_python_sets():
    g = rng(26)
    a, b = g.random((20, 16)) < 0.5, g.random((20, 16)) < 0.4
    a[0], b[0] = False, False  # both empty -> 1
    a[1], b[1] = np.arange(16) < 8, np.arange(16) >= 8  # disjoint -> 0
    iou = patterns.kept_iou(a, b)
    for i in range(20):
        sa, sb = set(np.flatnonzero(a[i])), set(np.flatnonzero(b[i]))
        expected = 1.0 if not (sa | sb) else len(sa & sb) / len(sa | sb)
        assert iou[i] == pytest.approx(expected)
    assert iou[0] == 1 and iou[1] == 0
    np.testing.assert_array_equal(patterns.kept_iou(a, a), 1.0)


def test_kept_patches_excludes_fused_token():
    composed = np.array([[0, -1, 1, 2, 2, 2], [-1, -1, 0, 1, 2, 3]])
    np.testing.assert_array_equal(
        patterns.kept_patches(composed),
        [[True, False, True, False, False, False], [False, False, True, True, True, True]],
    )


def sklearn_reference(a, b):
    h, c, v = skm.homogeneity_completeness_v_measure(a, b)
    return h, c, v, skm.adjusted_rand_score(a, b)


def test_cluster_agreement_matches_sklearn_per_image():
    g = rng(27)
    B, P = 12, 30
    a = g.integers(0, 6, size=(B, P))
    b = g.integers(-1, 4, size=(B, P)) * 10 + 5  # sparse, negative ids
    a[0] = 3  # single cluster rows
    b[1] = -1
    a[2] = np.arange(P)  # all singletons
    out = patterns.cluster_agreement(a, b)
    for i in range(B):
        h, c, v, ari = sklearn_reference(a[i], b[i])
        assert out["homogeneity"][i] == pytest.approx(h, abs=1e-10)
        assert out["completeness"][i] == pytest.approx(c, abs=1e-10)
        assert out["v_measure"][i] == pytest.approx(v, abs=1e-10)
        assert out["v_measure"][i] == pytest.approx(skm.normalized_mutual_info_score(a[i], b[i]), abs=1e-10)
        assert out["ari"][i] == pytest.approx(ari, abs=1e-10)


def test_cluster_agreement_identical_and_permuted_labels():
    g = rng(28)
    a = g.integers(0, 5, size=(6, 20))
    perm = np.array([4, 2, 0, 1, 3])
    for other in (a, perm[a] + 100):
        out = patterns.cluster_agreement(a, other)
        for key in ("homogeneity", "completeness", "v_measure", "ari"):
            np.testing.assert_allclose(out[key], 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="integers"):
        patterns.cluster_agreement(a.astype(float), a)


def test_token_depth_and_map():
    blocks = [3, 6, 9]
    kept = np.ones((3, 2, 4), dtype=bool)
    kept[0, 0, 1] = kept[1, 0, 1] = kept[2, 0, 1] = False  # dropped at block 3
    kept[1, 1, 2] = kept[2, 1, 2] = False  # dropped at block 6
    kept[2, 0, 3] = False
    depth = patterns.token_depth_from_kept(kept, blocks, 12)
    np.testing.assert_array_equal(depth, [[12, 3, 12, 9], [12, 12, 6, 12]])
    mean, std = patterns.token_depth_map(depth, (2, 2))
    np.testing.assert_allclose(mean, [[12, 7.5], [9, 10.5]])
    np.testing.assert_allclose(std, [[0, 4.5], [3, 1.5]])
    with pytest.raises(ValueError, match="square"):
        patterns.token_depth_map(np.zeros((1, 6)))


def test_count_tokens():
    composed = np.array([[0, 0, 1, -1, 2, 2], [-1, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(patterns.count_tokens(composed), [3, 0])


# ---------------------------------------------------------------- heatmaps


def blob(seed=0, shape=(8, 8)):
    m = np.zeros(shape)
    m[2:6, 2:6] = rng(seed).random((4, 4)) + 0.1
    return m


def test_heatmap_identities():
    m = rng(29).random((14, 14)) + 0.01
    assert heatmaps.pearson_cc(m, m) == pytest.approx(1)
    assert heatmaps.spearman_cc(m, m) == pytest.approx(1)
    assert heatmaps.kld(m, m) == pytest.approx(0, abs=1e-12)
    assert heatmaps.jsd(m, m) == pytest.approx(0, abs=1e-12)
    assert heatmaps.similarity(m, m) == pytest.approx(1)
    assert heatmaps.emd(m, m) == pytest.approx(0, abs=1e-12)
    out = heatmaps.heatmap_metrics(m, 3 * m)  # scale invariant
    assert list(out) == list(heatmaps.HEATMAP_METRICS)
    assert out["KLD12"] == pytest.approx(0, abs=1e-12) and out["EMD"] == pytest.approx(0, abs=1e-9)


def test_heatmap_values_against_references():
    g = rng(30)
    a, b = g.random((6, 6)) + 0.05, g.random((6, 6)) + 0.05
    p, q = a / a.sum(), b / b.sum()
    # the study's log base 2 is the default; natural log on request
    assert heatmaps.kld(a, b) == pytest.approx(stats.entropy(q.ravel(), p.ravel(), base=2), rel=1e-9)
    assert heatmaps.kld(b, a) == pytest.approx(stats.entropy(p.ravel(), q.ravel(), base=2), rel=1e-9)
    assert heatmaps.kld(a, b, base=np.e) == pytest.approx(stats.entropy(q.ravel(), p.ravel()), rel=1e-9)
    assert heatmaps.kld(a, b, base=np.e) == pytest.approx(heatmaps.kld(a, b) * math.log(2))
    from scipy.spatial.distance import jensenshannon
    assert heatmaps.jsd(a, b) == pytest.approx(jensenshannon(p.ravel(), q.ravel(), base=2) ** 2, rel=1e-9)
    assert heatmaps.jsd(a, b, base=np.e) == pytest.approx(jensenshannon(p.ravel(), q.ravel()) ** 2, rel=1e-9)
    assert heatmaps.heatmap_metrics(a, b)["KLD12"] == pytest.approx(heatmaps.kld(a, b, base=2))
    with pytest.raises(ValueError, match="log base"):
        heatmaps.kld(a, b, base=1)
    assert heatmaps.pearson_cc(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert heatmaps.spearman_cc(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel()).statistic)
    # SIM: min-max, sum-normalise, intersect
    mm = lambda x: (x - x.min()) / (x.max() - x.min())
    assert heatmaps.similarity(a, b) == pytest.approx(np.minimum(mm(a) / mm(a).sum(), mm(b) / mm(b).sum()).sum())
    # disjoint supports: JSD = 1 bit (log 2 nats), SIM = 0 (after min-max both have zeros elsewhere)
    d1, d2 = np.zeros((4, 4)), np.zeros((4, 4))
    d1[0, 0], d2[3, 3] = 1, 1
    assert heatmaps.jsd(d1, d2) == pytest.approx(1.0)
    assert heatmaps.jsd(d1, d2, base=np.e) == pytest.approx(math.log(2))
    assert heatmaps.similarity(d1, d2) == 0
    assert np.isnan(heatmaps.pearson_cc(np.ones((3, 3)), a[:3, :3]))


def test_emd_shifts_and_scipy_reference():
    m = blob(1)
    assert heatmaps.emd(m, np.roll(m, 1, axis=1)) == pytest.approx(1, abs=1e-7)
    assert heatmaps.emd(m, np.roll(np.roll(m, 1, axis=0), 1, axis=1)) == pytest.approx(math.sqrt(2), abs=1e-7)
    d1, d2 = np.zeros((14, 14)), np.zeros((14, 14))
    d1[2, 3], d2[7, 11] = 1, 1
    assert heatmaps.emd(d1, d2) == pytest.approx(math.hypot(5, 8), abs=1e-7)
    g = rng(31)
    a, b = g.random((5, 5)), g.random((5, 5))
    r, c = np.divmod(np.arange(25), 5)
    coords = np.stack([r, c], 1).astype(float)
    expected = stats.wasserstein_distance_nd(coords, coords, a.ravel(), b.ravel())
    assert heatmaps.emd(a, b) == pytest.approx(expected, abs=1e-7)
    # explicit ground distance path (no shared-mass shortcut) agrees
    assert heatmaps.emd(a, b, heatmaps.grid_distance(5, 5)) == pytest.approx(expected, abs=1e-7)


# ---------------------------------------------------------------- correlate


def test_correlate_against_scipy():
    g = rng(32)
    df = pd.DataFrame({"diff": g.normal(size=12), "x": g.normal(size=12), "y": g.normal(size=12)})
    df.loc[2, "x"] = np.nan
    df.loc[5, "diff"] = np.nan
    df["const"] = 1.0
    out = correlate.correlate(df, "diff", ["x", "y", "const"]).set_index("measure")
    for col in ("x", "y"):
        ok = df["diff"].notna() & df[col].notna()
        s = stats.spearmanr(df["diff"][ok], df[col][ok])
        k = stats.kendalltau(df["diff"][ok], df[col][ok])
        assert out.loc[col, "n"] == ok.sum()
        assert out.loc[col, "spearman_rho"] == pytest.approx(s.statistic)
        assert out.loc[col, "spearman_p"] == pytest.approx(s.pvalue)
        assert out.loc[col, "kendall_tau"] == pytest.approx(k.statistic)
        assert out.loc[col, "kendall_p"] == pytest.approx(k.pvalue)
    assert out.loc["x", "n"] == 10 and np.isnan(out.loc["const", "spearman_rho"])
    with pytest.raises(ValueError, match="nope"):
        correlate.correlate(df, "diff", ["nope"])


# ---------------------------------------------------------------- compare drivers


def runs_table():
    return pd.DataFrame(
        [
            ("topk_s_09", "topk", "small", 0.9, "IM", 79.0),
            ("topk_s_07", "topk", "small", 0.7, "IM", 77.0),
            ("topk_s_05", "topk", "small", 0.5, "IM", 70.0),
            ("topk_t_07", "topk", "tiny", 0.7, "IM", 68.0),
            ("topk_b_07", "topk", "base", 0.7, "IM", 80.0),
            ("tome_s_07", "tome", "small", 0.7, "IM", 76.0),
            ("evit_s_07", "evit", "small", 0.7, "IM", 78.0),
            ("topk_s_07_nab", "topk", "small", 0.7, "NAB", 80.0),
            ("topk_s_05_nab", "topk", "small", 0.5, "NAB", 75.0),
        ],
        columns=["run", "method", "capacity", "keep_rate", "dataset", "acc1"],
    )


def pair_set(df):
    return set(zip(df["run_a"], df["run_b"]))


def test_pairs_enumeration():
    runs = runs_table()
    rates = compare.pairs(runs, "rates")
    assert pair_set(rates) == {
        ("topk_s_09", "topk_s_07"), ("topk_s_09", "topk_s_05"), ("topk_s_07", "topk_s_05"),
        ("topk_s_07_nab", "topk_s_05_nab"),
    }
    assert len(rates) == 4
    row = rates.set_index(["run_a", "run_b"]).loc[("topk_s_09", "topk_s_05")]
    assert (row["keep_rate_a"], row["keep_rate_b"], row["acc1_a"], row["acc1_b"]) == (0.9, 0.5, 79.0, 70.0)
    cap = compare.pairs(runs, "capacity")
    assert pair_set(cap) == {("topk_s_07", "topk_t_07"), ("topk_b_07", "topk_t_07"), ("topk_b_07", "topk_s_07")}
    models = compare.pairs(runs, "models", symmetric=False)
    assert pair_set(models) == {("evit_s_07", "tome_s_07"), ("evit_s_07", "topk_s_07"), ("tome_s_07", "topk_s_07")}
    sym = compare.pairs(runs, "models")  # the study's models tables hold both orders
    assert pair_set(sym) == pair_set(models) | {(b, a) for a, b in pair_set(models)}
    assert len(compare.pairs(runs, "rates", symmetric=True)) == 8
    with pytest.raises(ValueError, match="axis"):
        compare.pairs(runs, "depth")
    with pytest.raises(ValueError, match="capacity"):
        compare.pairs(runs.assign(capacity="medium"), "capacity")
    with pytest.raises(ValueError, match="lacks"):
        compare.pairs(runs.drop(columns="dataset"), "rates")


def prune_patterns(kept_sets, ids, P=8, blocks=(3, 6)):
    """composed assignments of a pure pruning run from per-stage kept index lists."""
    S = len(blocks)
    composed = np.full((S, len(ids), P), -1, dtype=np.int64)
    for s in range(S):
        for i in range(len(ids)):
            idx = sorted(kept_sets[s][i])
            composed[s, i, idx] = np.arange(len(idx))
    return {"stage_blocks": np.array(blocks), "composed": composed, "kind": np.array("prune"),
            "image_ids": np.array(ids)}


def test_compare_patterns_prune_aligned_by_image_id():
    ids = ["a", "b", "c"]
    kept_a = [[{0, 1, 2, 3}, {0, 1, 4, 5}, {2, 3, 4, 5}], [{0, 1}, {0, 4}, {2, 3}]]
    kept_b = [[{0, 1, 2, 4}, {0, 1, 4, 5}, {6, 7, 4, 5}], [{0, 1}, {1, 5}, {6, 7}]]
    pa = prune_patterns(kept_a, ids)
    pb = prune_patterns(kept_b, ids)
    # B's images in another order: aligned by id
    order = [2, 0, 1]
    pb_shuffled = dict(pb, composed=pb["composed"][:, order], image_ids=pb["image_ids"][order])
    out = compare.compare_patterns(pa, pb_shuffled, names=("runA", "runB"))
    assert list(out.columns) == list(compare.PATTERN_COLUMNS)
    assert out["block"].tolist() == [3, 6]
    for s in range(2):
        ious = [len(kept_a[s][i] & kept_b[s][i]) / len(kept_a[s][i] | kept_b[s][i]) for i in range(3)]
        assert out.loc[s, "IoU_mean"] == pytest.approx(np.mean(ious))
        assert out.loc[s, "IoU_std"] == pytest.approx(np.std(ious))
    assert out["NMI_mean"].isna().all()  # not merge-like
    with pytest.raises(ValueError, match="runA.*runB"):
        compare.compare_patterns(pa, dict(pb, image_ids=np.array(["a", "b", "z"])), names=("runA", "runB"))


def test_compare_patterns_merge_and_block_intersection():
    g = rng(33)
    ids = [f"img{i}" for i in range(5)]
    ca = g.integers(0, 4, size=(2, 5, 12))
    cb = g.integers(0, 3, size=(2, 5, 12))
    pa = {"stage_blocks": np.array([3, 6]), "composed": ca, "kind": "merge", "image_ids": np.array(ids)}
    pb = {"stage_blocks": np.array([6, 9]), "composed": cb, "kind": np.array("soft"), "image_ids": np.array(ids)}
    out = compare.compare_patterns(pa, pb)
    assert out["block"].tolist() == [6] and out.loc[0, "stage_a"] == 1 and out.loc[0, "stage_b"] == 0
    hs = [skm.homogeneity_completeness_v_measure(cb[0, i], ca[1, i]) for i in range(5)]  # study's order
    assert out.loc[0, "Homogeneity_mean"] == pytest.approx(np.mean([h[0] for h in hs]))
    assert out.loc[0, "Completeness_std"] == pytest.approx(np.std([h[1] for h in hs]))
    assert out.loc[0, "NMI_mean"] == pytest.approx(np.mean([h[2] for h in hs]))
    assert out.loc[0, "ARI_mean"] == pytest.approx(np.mean([skm.adjusted_rand_score(cb[0, i], ca[1, i]) for i in range(5)]))
    assert np.isnan(out.loc[0, "IoU_mean"])  # no dropped patches, not prune
    with pytest.raises(ValueError, match="kind"):
        compare.compare_patterns(dict(pa, kind="cluster"), pb)


def test_compare_features_aligned():
    g = rng(34)
    ids = np.array([f"i{k}" for k in range(20)])
    fa = g.normal(size=(2, 20, 6)).astype(np.float32)
    perm = g.permutation(20)
    feats_a = {"blocks": np.array([3, 11]), "features": fa, "image_ids": ids}
    # same features, other image order, B has an extra block
    fb = np.concatenate([fa[:, perm], g.normal(size=(1, 20, 6)).astype(np.float32)])
    feats_b = {"blocks": np.array([3, 11, 6]), "features": fb, "image_ids": ids[perm]}
    out = compare.compare_features(feats_a, feats_b)
    assert list(out.columns) == list(compare.FEATURE_COLUMNS) and out["block"].tolist() == [3, 11]
    np.testing.assert_allclose(out["LinCKA"], 0, atol=1e-6)
    np.testing.assert_allclose(out["MeanCCA"], 1, atol=1e-6)
    np.testing.assert_allclose(out["Procrustes"], 0, atol=1e-6)
    other = dict(feats_b, features=g.normal(size=(3, 20, 4)))
    got = compare.compare_features(feats_a, other).set_index("block").loc[11]
    ref = similarity.feature_similarities(fa[1].T, other["features"][1][np.argsort(perm)].T)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v)


def test_token_statistics_prune_and_merge(tmp_path):
    ids = ["a", "b"]
    kept = [[{0, 1, 2}, {1, 2, 3}], [{0}, {3}]]
    p = prune_patterns(kept, ids, P=4, blocks=(3, 6))
    np.savez(tmp_path / "patterns.npz", **p)
    loaded = compare.load_npz(tmp_path / "patterns.npz")
    assert loaded["kind"] == "prune"
    st = compare.token_statistics(loaded, depth=12)
    # depths: image a: [12, 6, 6, 3]; image b: [3, 6, 6, 12]
    np.testing.assert_allclose(st["depth_map_mean"], [[7.5, 6], [6, 7.5]])
    np.testing.assert_allclose(st["depth_map_std"], [[4.5, 0], [0, 4.5]])
    allv = np.array([12, 6, 6, 3, 3, 6, 6, 12])
    assert st["mean_depth"] == pytest.approx(allv.mean()) and st["std_depth"] == pytest.approx(allv.std())
    np.testing.assert_allclose(st["reduction_mean"], [0.75, 0.25])
    merge = {"stage_blocks": np.array([3]), "composed": np.array([[[0, 0, 1, 1], [0, 1, 2, 2]]]),
             "kind": "merge", "image_ids": np.array(ids)}
    sm = compare.token_statistics(merge, depth=12)
    np.testing.assert_allclose(sm["reduction_mean"], [0.625])
    assert np.isnan(sm["mean_depth"]) and np.isnan(sm["depth_map_mean"]).all()
    base = {"stage_blocks": np.zeros(0, int), "composed": np.zeros((0, 2, 4), int), "kind": "none",
            "image_ids": np.array(ids)}
    assert compare.token_statistics(base, depth=12)["mean_depth"] == 12
    with pytest.raises(ValueError, match="depth"):
        compare.token_statistics(p, depth=5)


def test_token_statistics_from_a_real_evit_forward():
    import tokenreduction as tr

    torch.manual_seed(0)
    m = tr.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2,
                        num_classes=5, method="evit", keep_rate=0.5).eval()
    with torch.no_grad():
        m(torch.randn(3, 3, 32, 32))
    composed = torch.stack(tr.model_patterns(m)).numpy()
    p = {"stage_blocks": np.array([3, 6, 9]), "composed": composed, "kind": "prune",
         "image_ids": np.array(["x", "y", "z"])}
    st = compare.token_statistics(p, depth=12)
    # a kept patch is a token of its own: EViT's fused token (and patches
    # fused earlier and carried on inside it) are not kept
    from collections import Counter

    expected = []
    for s in range(3):
        per_image = []
        for row in composed[s]:
            counts = Counter(row.tolist())
            per_image.append(sum(1 for t in row.tolist() if t >= 0 and counts[t] == 1) / 64)
        expected.append(np.mean(per_image))
    np.testing.assert_allclose(st["reduction_mean"], expected)
    assert st["reduction_mean"][0] == (m.tokens_kept[0] - 1) / 64  # stage 1: all but the fused token
    assert (st["reduction_mean"] <= (np.array(m.tokens_kept) - 1) / 64).all()
    np.testing.assert_allclose(st["depth_map_mean"].mean(), st["mean_depth"])
    assert st["depth_map_mean"].shape == (8, 8)

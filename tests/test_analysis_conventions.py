"""The study's analysis conventions, each pinned by a small value-level case:
H/C argument order per axis, PWCCA normalisation, degenerate CCA, KL base,
K-Medoids/DPC-KNN centres as kept tokens, the models axis' baseline pairs,
per-method correlation groups, exact small-n p-values, figures."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from tokenreduction.analysis import compare, correlate, similarity, stage


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- H/C order per axis


def test_homogeneity_completeness_order_follows_the_study_per_axis():
    # A splits the 4 patches into singletons, B lumps them into one cluster:
    # homogeneity(true=A, pred=B) = 0, completeness = 1; swapped the other way
    a = np.array([[[0, 1, 2, 3]]])
    b = np.array([[[0, 0, 0, 0]]])
    pa = {"stage_blocks": np.array([3]), "composed": a, "kind": "merge", "image_ids": np.array(["x"])}
    pb = {"stage_blocks": np.array([3]), "composed": b, "kind": "merge", "image_ids": np.array(["x"])}
    assert compare.HC_TRUE == {"rates": "b", "capacity": "a", "models": "a"}
    h, c, _ = skm.homogeneity_completeness_v_measure(a[0, 0], b[0, 0])  # (cluster1, cluster2)
    assert (h, c) == (pytest.approx(0.0), pytest.approx(1.0))
    cap = compare.compare_patterns(pa, pb, hc_true=compare.HC_TRUE["capacity"]).iloc[0]
    rates = compare.compare_patterns(pa, pb, hc_true=compare.HC_TRUE["rates"]).iloc[0]
    assert (cap.Homogeneity_mean, cap.Completeness_mean) == (pytest.approx(h), pytest.approx(c))
    assert (rates.Homogeneity_mean, rates.Completeness_mean) == (pytest.approx(c), pytest.approx(h))
    with pytest.raises(ValueError, match="hc_true"):
        compare.compare_patterns(pa, pb, hc_true="x")


# ---------------------------------------------------------------- PWCCA


def test_pwcca_study_and_paired_on_a_wide_vs_narrow_pair():
    # A = (z1, z2), B = (z1): one canonical pair with rho 1; A's unpaired
    # variate z2 has the same weight as the paired one, so the study's
    # normalisation over all of A's variates gives 1 - 0.5 * 1 = 0.5 and the
    # paired-only normalisation 1 - 1 * 1 = 0
    z = rng(1).normal(size=(2, 60))
    z -= z.mean(1, keepdims=True)
    q, _ = np.linalg.qr(z.T)
    z1, z2 = q.T
    A, B = np.stack([z1, z2]), z1[None]
    assert similarity.pwcca_dist(A, B) == pytest.approx(0.5, abs=1e-9)  # study: the default
    assert similarity.pwcca_dist(A, B, pwcca="study") == pytest.approx(0.5, abs=1e-9)
    assert similarity.pwcca_dist(A, B, pwcca="paired") == pytest.approx(0.0, abs=1e-9)
    assert similarity.feature_similarities(A, B)["PWCCA"] == pytest.approx(0.5, abs=1e-9)
    # narrow vs wide (A weighted, A narrower): both definitions agree
    assert similarity.pwcca_dist(B, A, pwcca="study") == pytest.approx(similarity.pwcca_dist(B, A, pwcca="paired"))
    with pytest.raises(ValueError, match="PWCCA mode"):
        similarity.pwcca_dist(A, B, pwcca="nope")


def study_pwcca_wide(A, B):
    """The study's eigen-whitening PWCCA written out: weights over all of A's
    variates, the first min(D_A, D_B) paired with rho."""
    a, b = similarity.preprocess(A), similarity.preprocess(B)
    ea, va = np.linalg.eigh(a @ a.T)
    eb, vb = np.linalg.eigh(b @ b.T)
    wa, wb = va @ np.diag(ea**-0.5) @ va.T, vb @ np.diag(eb**-0.5) @ vb.T
    u, rho, _ = np.linalg.svd(wa @ a @ b.T @ wb)
    weights = np.abs((u.T @ wa @ a) @ a.T).sum(1)
    weights = weights / weights.sum()
    return 1 - weights[: rho.size] @ rho


def test_pwcca_study_matches_the_reference_formula_when_a_is_wider():
    # D_A - D_B = 1: the unpaired variate is unique up to sign, so the study's
    # value is well defined and comparable
    A = rng(2).normal(size=(4, 50))
    B = rng(3).normal(size=(3, 50)) + 0.8 * A[:3]
    assert similarity.pwcca_dist(A, B) == pytest.approx(study_pwcca_wide(A, B), abs=1e-9)
    assert similarity.pwcca_dist(A, B, pwcca="paired") < similarity.pwcca_dist(A, B)


# ---------------------------------------------------------------- degenerate CCA


def test_degenerate_cca_warns_and_gives_nan():
    g = rng(4)
    A, B = g.normal(size=(6, 10)), g.normal(size=(4, 10))  # N = 10 <= 6 + 4
    assert similarity.cca_degenerate(6, 4, 10) and not similarity.cca_degenerate(6, 4, 11)
    with pytest.warns(similarity.DegenerateCCAWarning, match="10 images <= 6 \\+ 4"):
        sims = similarity.feature_similarities(A, B)
    assert all(math.isnan(sims[k]) for k in similarity.CCA_METRICS)
    assert math.isfinite(sims["LinCKA"]) and math.isfinite(sims["Procrustes"])
    with pytest.warns(similarity.DegenerateCCAWarning):
        assert math.isnan(similarity.pwcca_dist(A, B))
    with pytest.warns(similarity.DegenerateCCAWarning):
        assert math.isnan(similarity.mean_cca_corr(A, B))
    # one more image: defined, no warning
    A2, B2 = g.normal(size=(6, 11)), g.normal(size=(4, 11))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(similarity.feature_similarities(A2, B2)["MeanCCA"])


# ---------------------------------------------------------------- kept tokens


def test_recorded_centres_count_as_kept_tokens_in_iou_and_depth():
    # a K-Medoids-like run: every patch joins a cluster (no -1), the centres
    # (patches 0 and 2, then 0) are recorded as `kept`
    composed = np.array([[[0, 0, 1, 1]], [[0, 0, 0, 0]]])
    kept = np.array([[[True, False, True, False]], [[True, False, False, False]]])
    km = {"stage_blocks": np.array([3, 6]), "composed": composed, "kind": "merge",
          "image_ids": np.array(["x"]), "kept": kept}
    topk = {"stage_blocks": np.array([3, 6]), "composed": np.array([[[0, 1, -1, -1]], [[0, -1, -1, -1]]]),
            "kind": "prune", "image_ids": np.array(["x"])}
    out = compare.compare_patterns(km, topk)
    # stage 3: {0, 2} vs {0, 1} -> 1/3; stage 6: {0} vs {0} -> 1
    np.testing.assert_allclose(out["IoU_mean"], [1 / 3, 1.0])
    st = compare.token_statistics(km, depth=12)
    assert st["prune_like"]
    np.testing.assert_allclose(st["depth_map_mean"], [[12, 3], [6, 3]])
    # without the record the run is a clustering only: no depth map
    plain = {k: v for k, v in km.items() if k != "kept"}
    assert np.isnan(compare.token_statistics(plain, depth=12)["mean_depth"])
    with pytest.raises(ValueError, match="kept has shape"):
        compare.compare_patterns(dict(km, kept=kept[:1]), topk)


# ---------------------------------------------------------------- pairs


def test_models_axis_pairs_the_baseline_with_keep_rate_09():
    runs = pd.DataFrame(
        [("deit", "deit", "s", 1.0), ("topk9", "topk", "s", 0.9), ("evit9", "evit", "s", 0.9),
         ("topk7", "topk", "s", 0.7), ("evit7", "evit", "s", 0.7)],
        columns=["run", "method", "capacity", "keep_rate"],
    ).assign(dataset="IM")
    got = set(zip(*compare.pairs(runs, "models", symmetric=False)[["run_a", "run_b"]].T.values))
    assert got == {("deit", "topk9"), ("deit", "evit9"), ("evit9", "topk9"), ("evit7", "topk7")}
    sym = compare.pairs(runs, "models")
    assert len(sym) == 8 and ("topk9", "deit") in set(zip(sym.run_a, sym.run_b))
    row = sym.set_index(["run_a", "run_b"]).loc[("deit", "topk9")]
    assert (row.keep_rate_a, row.keep_rate_b) == (1.0, 0.9)  # the real rates are carried
    off = compare.pairs(runs, "models", symmetric=False, baseline_rate=None)
    assert not (off.run_a == "deit").any()


# ---------------------------------------------------------------- correlations


def test_exact_permutation_p_values_for_small_n():
    df = pd.DataFrame({"d": [1.0, 2.0, 3.0, 4.0], "m": [10.0, 20.0, 30.0, 40.0]})
    row = correlate.correlate(df, "d", ["m"]).iloc[0]
    assert row.spearman_rho == pytest.approx(1.0) and row.kendall_tau == pytest.approx(1.0)
    # 2 of the 4! pairings reach |rho| = 1: p = 1/12 (the t approximation says 0)
    assert row.spearman_p == pytest.approx(2 / 24) and row.kendall_p == pytest.approx(2 / 24)
    assert row.p_method == "exact-permutation"
    # n = 5, one swap: rho = 0.9; |rho| >= 0.9 in 10 of 120 pairings
    df5 = pd.DataFrame({"d": [1.0, 2, 3, 4, 5], "m": [1.0, 2, 3, 5, 4]})
    r5 = correlate.correlate(df5, "d", ["m"]).iloc[0]
    assert r5.spearman_rho == pytest.approx(0.9) and r5.spearman_p == pytest.approx(10 / 120)
    big = pd.DataFrame({"d": np.arange(12.0), "m": np.arange(12.0) ** 2})
    assert correlate.correlate(big, "d", ["m"]).iloc[0].p_method == "scipy"


def collated_models_table():
    """Models pairs of two methods A at one rate: within each method A the
    measure rises with the metric difference, pooled over both methods it falls."""
    rows = []
    for method, offset in (("evit", 0.0), ("topk", 10.0)):
        for i in range(4):
            rows.append({"axis": "models", "run_a": f"{method}", "run_b": f"other{i}",
                         "method_a": method, "method_b": f"other{i}", "capacity_a": "s", "capacity_b": "s",
                         "keep_rate_a": 0.7, "keep_rate_b": 0.7, "metric_a": 0, "metric_b": 0,
                         "metric_diff": offset + i, "IoU_mean@3": (1.0 - offset / 5) + 0.1 * i})
    return pd.DataFrame(rows)


def test_correlations_are_per_method_group_with_pooled_as_extra(tmp_path):
    table = collated_models_table()
    table.to_csv(tmp_path / "collated.csv", index=False)
    out = stage.correlate_axis(tmp_path / "collated.csv", tmp_path / "corr.csv", tmp_path / "corr.png",
                               axis="models", out_pooled=tmp_path / "pooled.csv")
    assert list(out.columns[:3]) == ["measure", "n", "spearman_rho"]
    assert set(out.group) == {"evit/s/0.7", "topk/s/0.7"}
    np.testing.assert_allclose(out.spearman_rho, [1.0, 1.0])  # per group: positive
    pooled = pd.read_csv(tmp_path / "pooled.csv").iloc[0]
    assert pooled.n == 8 and pooled.spearman_rho < 0  # pooled: the sign flips
    assert (tmp_path / "corr.png").read_bytes()[:4] == b"\x89PNG"


def test_one_order_per_pair_for_pooled_models_correlations():
    # both orders: the difference flips sign, a symmetric measure does not
    t = pd.DataFrame({"run_a": ["a", "b", "a", "c"], "run_b": ["b", "a", "c", "a"],
                      "metric_diff": [1.0, -1.0, 3.0, -3.0], "LinCKA@11": [0.2, 0.2, 0.5, 0.5]})
    one = stage.one_order(t)
    assert list(zip(one.run_a, one.run_b)) == [("a", "b"), ("a", "c")]
    rates = pd.DataFrame({"run_a": ["x"], "run_b": ["w"], "metric_diff": [1.0]})
    assert len(stage.one_order(rates)) == 1  # single order kept as is


def test_rho_matrix_and_heatmap(tmp_path):
    pooled = pd.DataFrame({"measure": ["IoU_mean@3", "IoU_mean@6", "LinCKA@3", "LinCKA@11"],
                           "spearman_rho": [0.5, -0.25, np.nan, 1.0]})
    mat = stage.rho_matrix(pooled)
    assert list(mat.index) == ["IoU", "LinCKA"] and list(mat.columns) == [3, 6, 11]
    assert mat.loc["IoU", 6] == -0.25 and np.isnan(mat.loc["LinCKA", 6]) and mat.loc["LinCKA", 11] == 1.0
    pooled.to_csv(tmp_path / "rates.csv", index=False)
    pd.DataFrame(columns=["measure", "spearman_rho"]).to_csv(tmp_path / "models.csv", index=False)
    mats = stage.rho_heatmap({"rates": tmp_path / "rates.csv", "models": tmp_path / "models.csv"},
                             tmp_path / "rho.png")
    assert mats["models"].empty
    assert (tmp_path / "rho.png").read_bytes()[:4] == b"\x89PNG"


def test_depth_heatmaps_share_one_colour_scale():
    stats = {"a": {"depth": 12, "depth_map_mean": np.full((2, 2), 3.0)},
             "b": {"depth": 12, "depth_map_mean": np.array([[6.0, 12.0], [9.0, 9.0]])}}
    assert stage.depth_scale(stats) == (0.0, 12.0)
    assert stage.depth_scale({"c": {"depth": 24, "depth_map_mean": np.ones((2, 2))}, **stats}) == (0.0, 24.0)


# ---------------------------------------------------------------- the drivers


def write_run(root, run, composed, kind, feats, ids):
    d = root / run
    d.mkdir(parents=True)
    np.savez(d / "patterns.npz", stage_blocks=np.array([3]), composed=composed, kind=np.array(kind),
             image_ids=ids, grid=np.array([2, 2]))
    np.savez(d / "cls_features.npz", blocks=np.array([11]), features=feats[None], image_ids=ids)


def test_compare_runs_uses_axis_order_pwcca_mode_and_flags_degenerate_cca(tmp_path, caplog):
    ids = np.array([f"i{k}" for k in range(12)])
    g = rng(5)
    summary = pd.DataFrame(
        [("D", "tiny", "tiny", "tome", 0.7, 0, 60.0), ("D", "small", "small", "tome", 0.7, 0, 70.0),
         ("D", "small", "small", "tome", 0.5, 0, 65.0)],
        columns=["dataset", "backbone", "capacity", "method", "keep_rate", "seed", "metric"],
    )
    summary.to_csv(tmp_path / "summary.csv", index=False)
    singletons = np.tile(np.arange(4), (1, 12, 1))
    lumped = np.zeros((1, 12, 4), dtype=int)
    base = g.normal(size=(12, 3))
    write_run(tmp_path / "eval", "D/tiny/tome/kr0.7/seed0", lumped, "merge", base[:, :2], ids)
    write_run(tmp_path / "eval", "D/small/tome/kr0.7/seed0", singletons, "merge", base, ids)
    write_run(tmp_path / "eval", "D/small/tome/kr0.5/seed0", lumped, "merge", g.normal(size=(12, 10)), ids)
    cap = stage.compare_runs(tmp_path / "summary.csv", "D", "capacity", tmp_path / "eval", tmp_path / "cap.csv")
    pat = cap[cap.source == "pattern"].iloc[0]
    assert pat.run_a == "D/small/tome/kr0.7/seed0"  # A = the larger capacity (singletons)
    # capacity: true = A (singletons), pred = B (one cluster): homogeneity 0... of the singletons' view
    h, c, _ = skm.homogeneity_completeness_v_measure(singletons[0, 0], lumped[0, 0])
    assert (pat.Homogeneity_mean, pat.Completeness_mean) == (pytest.approx(h), pytest.approx(c))
    feat = cap[cap.source == "feature"].iloc[0]
    # A (3 wide) vs B (2 wide, B = A's first two features): study PWCCA > paired PWCCA = 0
    paired = stage.compare_runs(tmp_path / "summary.csv", "D", "capacity", tmp_path / "eval",
                                tmp_path / "cap2.csv", pwcca="paired")
    assert paired[paired.source == "feature"].iloc[0].PWCCA == pytest.approx(0, abs=1e-9)
    assert feat.PWCCA > 0.1
    # rates: 0.7 (3 wide) vs 0.5 (10 wide), 12 images <= 13: degenerate -> NaN + a log warning
    with caplog.at_level("WARNING"):
        rates = stage.compare_runs(tmp_path / "summary.csv", "D", "rates", tmp_path / "eval", tmp_path / "rates.csv")
    rf = rates[rates.source == "feature"].iloc[0]
    assert math.isnan(rf.PWCCA) and math.isnan(rf.MeanCCA) and math.isfinite(rf.LinCKA)
    assert "degenerate CCA" in caplog.text
    rp = rates[rates.source == "pattern"].iloc[0]
    # rates: true = B (the lumped 0.5 run), pred = A (singletons)
    h, c, _ = skm.homogeneity_completeness_v_measure(lumped[0, 0], singletons[0, 0])
    assert (rp.Homogeneity_mean, rp.Completeness_mean) == (pytest.approx(h), pytest.approx(c))


def test_kept_from_centres_chains_centres_back_to_patches():
    # 6 patches; stage 1 keeps tokens at input positions 1, 4, 5; stage 2 the
    # stage-1 tokens 0 and 2, i.e. patches 1 and 5
    kept = patterns_kept([np.array([[1, 4, 5]]), np.array([[0, 2]])], 6)
    np.testing.assert_array_equal(kept[0, 0], [0, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(kept[1, 0], [0, 1, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="outside"):
        patterns_kept([np.array([[1, 6]])], 6)


def patterns_kept(centres, P):
    from tokenreduction.analysis.patterns import kept_from_centres

    return kept_from_centres(centres, P)


@pytest.mark.parametrize("method", ["kmedoids", "dpcknn"])
def test_clustering_methods_report_centres_that_are_their_own_tokens(method):
    import torch

    import tokenreduction as tr

    torch.manual_seed(0)
    m = tr.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=16, depth=12, num_heads=2,
                        num_classes=3, method=method, keep_rate=0.5).eval()
    with torch.no_grad():
        m(torch.randn(2, 3, 32, 32))
    centres = [a["centres"] for a in m.reduction_state.aux if "centres" in a]
    composed = torch.stack(tr.model_patterns(m)).numpy()
    assert len(centres) == composed.shape[0] == 3
    kept = patterns_kept(centres, 64)
    assert kept.sum(-1).tolist() == [[t] * 2 for t in m.tokens_kept]
    for s in range(3):
        for b in range(2):
            # each output token has exactly one kept patch: its own centre
            assert sorted(composed[s, b][kept[s, b]].tolist()) == list(range(m.tokens_kept[s]))
    # the analysis then treats the run as prune-like by its centres
    p = {"stage_blocks": np.array([3, 6, 9]), "composed": composed, "kind": "merge",
         "image_ids": np.array(["a", "b"]), "kept": kept}
    st = compare.token_statistics(p, depth=12)
    assert st["prune_like"] and np.isfinite(st["mean_depth"])


def test_evaluator_records_kmedoids_centres_as_kept(tmp_path):
    import torch
    from PIL import Image

    from tokenreduction.evaluate import evaluate
    from tokenreduction.train import train

    rng_ = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 3)):
        for c in range(2):
            d = tmp_path / "data" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng_.random((16, 16, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    torch.manual_seed(0)
    train(dict(model="vit_tiny_patch16_224", model_kwargs=dict(patch_size=4, embed_dim=16, depth=4, num_heads=2),
               img_size=16, dataset="imagefolder", data_root=str(tmp_path / "data"), epochs=1, warmup_epochs=0,
               batch_size=4, lr=1e-3, lr_batch_normalizer=None, num_workers=0, model_ema=False,
               method="kmedoids", keep_rate=0.5, reduction_loc=[1, 2]), tmp_path / "run")
    evaluate(tmp_path / "run" / "final.pth", "imagefolder", tmp_path / "data", split="val",
             out_patterns=tmp_path / "patterns.npz", num_pattern_images=5, batch_size=4, device="cpu",
             throughput_batch=2)
    p = compare.load_npz(tmp_path / "patterns.npz")
    assert p["kept"].shape == p["composed"].shape == (2, 5, 16) and p["kind"] == "merge"
    # geometric budget 0.5: 8 then 4 centres per image, each its own token
    assert p["kept"].sum(-1).tolist() == [[8] * 5, [4] * 5]
    for s in range(2):
        for b in range(5):
            assert sorted(p["composed"][s, b][p["kept"][s, b]].tolist()) == list(range(p["kept"][s, b].sum()))


def test_pooled_models_correlation_uses_the_absolute_difference(tmp_path):
    # one order per pair, but which run sorts first is arbitrary across methods:
    # the pooled models table correlates the measure with |metric A - metric B|
    t = collated_models_table().iloc[:4].assign(metric_diff=[-3.0, -1.0, 1.0, 3.0],
                                                run_b=["w", "x", "y", "z"])
    t["IoU_mean@3"] = [3.0, 1.0, 1.5, 3.5]
    t.to_csv(tmp_path / "c.csv", index=False)
    stage.correlate_axis(tmp_path / "c.csv", tmp_path / "g.csv", tmp_path / "f.png", axis="models",
                         out_pooled=tmp_path / "p.csv")
    from scipy import stats

    expected = stats.spearmanr([3.0, 1.0, 1.0, 3.0], t["IoU_mean@3"]).statistic  # |diff|: 0.894
    assert pd.read_csv(tmp_path / "p.csv").iloc[0].spearman_rho == pytest.approx(expected)
    t.assign(axis="rates").to_csv(tmp_path / "r.csv", index=False)
    stage.correlate_axis(tmp_path / "r.csv", tmp_path / "g2.csv", tmp_path / "f2.png", axis="rates",
                         out_pooled=tmp_path / "p2.csv")
    assert pd.read_csv(tmp_path / "p2.csv").iloc[0].spearman_rho == pytest.approx(0.4)  # signed on other axes

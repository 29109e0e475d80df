"""The compiled clustering kernel (backend "native"): SciPy's partition,
bit for bit, on random, tied and asymmetric inputs, across threads, the
fused cosine path for Stable Diffusion, its build, fallback and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from tokenreduction.diffusion.merge import atc_assignment, cosine_distance
from tokenreduction.reduction import _native_clustering as native
from tokenreduction.reduction import clustering
from tokenreduction.reduction.clustering import agglomerative_labels, cosine_agglomerative_labels

LINKAGES = ["single", "complete", "average"]

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native kernel is not built")


def _scipy(distance: torch.Tensor, k: int, method: str) -> np.ndarray:
    """SciPy's partition of each image (upper triangle), points named by
    the smallest member of their cluster."""
    out = []
    n = distance.shape[1]
    rows, cols = np.triu_indices(n, 1)
    for d in distance.double().numpy():
        lab = fcluster(linkage(d[rows, cols], method=method), k, criterion="maxclust")
        _, first, inverse = np.unique(lab, return_index=True, return_inverse=True)
        out.append(first[inverse.reshape(-1)])
    return np.stack(out)


def _scipy_first_merges(distance: torch.Tensor, k: int, method: str) -> torch.Tensor:
    """The partition made by the first N - K rows of SciPy's linkage matrix
    (the library's contract; with tied heights ``fcluster(maxclust)`` may
    stop short of K clusters)."""
    n = distance.shape[1]
    rows, cols = np.triu_indices(n, 1)
    merges = [linkage(d[rows, cols], method=method)[: n - k, :2] for d in distance.double().numpy()]
    return clustering.labels_from_merges(torch.from_numpy(np.stack(merges).astype(np.int64)), n)


@pytest.mark.parametrize("method", LINKAGES)
def test_random_and_tied_inputs_equal_scipy(method):
    """Float32 cosine distances at ATC's size and integer-valued distances
    (many equal heights, where SciPy's chain order decides), for K from 1 to
    N - 1: the partition of SciPy's dendrogram, image by image. N=150 with K
    small makes the early stop of the chain (checked every few merges) run."""
    g = torch.Generator().manual_seed(5)
    cos = cosine_distance(torch.randn(3, 150, 16, generator=g))
    ints = torch.randint(0, 5, (3, 90, 90), generator=g).double()
    ints = ints + ints.transpose(1, 2)
    for distance in (cos, ints):
        n = distance.shape[1]
        for k in (1, n // 4, n // 2, int(0.7 * n), n - 1):
            labels = agglomerative_labels(distance, k, method, backend="native")
            assert labels.dtype == torch.long and labels.shape == distance.shape[:2]
            assert torch.equal(labels, _scipy_first_merges(distance, k, method)), f"{method} K={k}"
            assert torch.equal(labels, agglomerative_labels(distance, k, method, backend="scipy"))
            if distance is cos:  # distinct heights: also fcluster's maxclust cut
                np.testing.assert_array_equal(labels.numpy(), _scipy(distance, k, method), err_msg=f"K={k}")


def test_only_the_upper_triangle_is_read():
    """As SciPy's condensed form: an asymmetric lower triangle is ignored."""
    g = torch.Generator().manual_seed(2)
    d = cosine_distance(torch.randn(2, 40, 8, generator=g)).double()
    noisy = d.clone()
    lower = torch.ones(40, 40, dtype=torch.bool).tril(-1)
    noisy[:, lower] = torch.rand(2, int(lower.sum()), generator=g, dtype=torch.float64)
    for method in LINKAGES:
        expected = agglomerative_labels(d, 13, method, backend="native")
        assert torch.equal(agglomerative_labels(noisy, 13, method, backend="native"), expected)
        np.testing.assert_array_equal(expected.numpy(), _scipy(d, 13, method))


def test_threads_split_the_batch_without_changing_labels():
    g = torch.Generator().manual_seed(3)
    d = cosine_distance(torch.randn(5, 60, 8, generator=g))
    one = native.run(d, 25, "average", threads=1)
    assert torch.equal(native.run(d, 25, "average", threads=3), one)
    assert torch.equal(native.run(d, 25, "average", threads=8), one)  # more threads than images
    np.testing.assert_array_equal(one.numpy(), _scipy(d, 35, "average"))


@pytest.mark.parametrize("method", LINKAGES)
def test_cosine_labels_fused_equal_distance_path(method):
    """The distance max(1 - s, 0) formed in the kernel gives the partition of
    the distance tensor computed in torch, duplicated and opposite tokens
    (distance rounding below 0, and 2) included."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 70, 16, generator=g)
    x[0, 1] = x[0, 0]
    x[0, 2] = -x[0, 0]
    x[1, 5] = 3 * x[1, 4]
    for k in (35, 49):
        fused = cosine_agglomerative_labels(x, k, method)
        assert torch.equal(fused, agglomerative_labels(cosine_distance(x), k, method, backend="scipy"))
    assignment, m = atc_assignment(x, 35, method)
    assert m == 35 and assignment.shape == (2, 70)


@pytest.mark.parametrize("method", LINKAGES)
def test_tiled_upper_similarity_keeps_partitions(method, monkeypatch):
    """With the similarity formed tile by tile (upper triangle only, a
    partial last tile), the distance equals the full product's, is exactly
    symmetric, and the fused kernel path still gives SciPy's partition."""
    monkeypatch.setattr(clustering, "SIMILARITY_TILE", 16)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 70, 8, generator=g)
    m = clustering.unit_rows(x)
    upper = torch.ones(70, 70, dtype=torch.bool).triu()
    assert torch.allclose(clustering.upper_similarity(m)[:, upper], (m @ m.transpose(1, 2))[:, upper], atol=1e-6)
    d = cosine_distance(x)
    assert torch.equal(d, d.transpose(1, 2))
    assert torch.allclose(d, (1 - m @ m.transpose(1, 2)).clamp_min(0), atol=1e-6)
    fused = cosine_agglomerative_labels(x, 30, method)
    assert torch.equal(fused, _scipy_first_merges(d, 30, method))
    # the per-thread scratch buffer is reused for a smaller batch
    assert torch.equal(cosine_agglomerative_labels(x[1:], 30, method), fused[1:])


@pytest.mark.parametrize("method", LINKAGES)
def test_vector_and_portable_row_loops_agree(method):
    """The AVX2 row loops (scans, merges, filling) and the portable ones give
    the same labels, for sizes that leave every vector loop a tail (not a
    multiple of 4, 8 or the 32-row fill block), on float32 cosine
    similarities (the fused path), float32 and float64 distances, with many
    tied distances (duplicated tokens: exact zeros and equal rows)."""
    g = torch.Generator().manual_seed(11)
    for n in (5, 37, 131):
        x = torch.randn(2, n, 6, generator=g)
        x[:, n // 2:] = x[:, : n - n // 2]  # every second half token duplicates one of the first half
        m = clustering.unit_rows(x)
        sims = (m @ m.transpose(1, 2)).contiguous()
        ints = torch.randint(0, 4, (2, n, n), generator=g).double()
        ints = ints + ints.transpose(1, 2)
        for k in (1, n // 3, n - 2):
            need = n - k
            vector = [native.run(sims, need, method, similarity=True), native.run(ints, need, method),
                      native.run(ints.float(), need, method)]
            with native.portable_only():
                portable = [native.run(sims, need, method, similarity=True), native.run(ints, need, method),
                            native.run(ints.float(), need, method)]
            for a, b in zip(vector, portable):
                assert torch.equal(a, b), f"n={n} K={k}"
            assert torch.equal(vector[1], _scipy_first_merges(ints, k, method)), f"n={n} K={k}"


def test_duplicated_tokens_at_a_latent_size_equal_scipy():
    """A 24 x 24 latent (N=576, K=N/2) whose tokens repeat (flat image
    regions: many exact zero distances and equal rows), clustered by the
    fused cosine path, gives SciPy's partition of the torch distance."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 576, 8, generator=g)
    x[0, 200:400] = x[0, 0]  # one flat region
    x[0, 450:] = x[0, 10:136]  # a repeated patch
    d = cosine_distance(x)
    for method in LINKAGES:
        assert torch.equal(cosine_agglomerative_labels(x, 288, method), _scipy_first_merges(d, 288, method))


def test_repeated_images_are_clustered_once(monkeypatch):
    """A batch with exact copies (classifier-free guidance: both halves the
    same latent) clusters each distinct image once; every image still gets
    the partition it gets alone."""
    g = torch.Generator().manual_seed(13)
    x0, x1, x2 = torch.randn(3, 80, 8, generator=g)
    batch = torch.stack([x0, x1, x0, x1, x2])
    alone = [cosine_agglomerative_labels(x[None], 30, "average")[0] for x in (x0, x1, x0, x1, x2)]
    seen = []
    run = native.run
    monkeypatch.setattr(native, "run", lambda d, *a, **k: seen.append(d.shape[0]) or run(d, *a, **k))
    labels = cosine_agglomerative_labels(batch, 30, "average")
    assert seen == [3]
    for b, expected in enumerate(alone):
        assert torch.equal(labels[b], expected)
    near_copy = batch.clone()
    near_copy[2, 5, 3] += 1e-6  # not an exact copy: clustered on its own
    cosine_agglomerative_labels(near_copy, 30, "average")
    assert seen[-1] == 4
    unique, representative = clustering.first_occurrences(batch)
    assert unique.tolist() == [0, 1, 4] and representative.tolist() == [0, 1, 0, 1, 2]
    assert clustering.first_occurrences(batch[[0, 1, 4]]) is None


def test_non_finite_entries_name_the_image():
    d = cosine_distance(torch.randn(4, 12, 3))
    d[2, 3, 7] = float("inf")
    with pytest.raises(ValueError, match="image 2"):
        agglomerative_labels(d, 5, "complete", backend="native")
    d[2, 3, 7] = 0.5
    d[2, 7, 3] = float("nan")  # lower triangle: not read, as by SciPy
    assert agglomerative_labels(d, 5, "complete", backend="native").shape == (4, 12)


def test_build_into_cache_and_fallback(tmp_path, monkeypatch):
    """The kernel builds into $TOKENREDUCTION_CACHE; TOKENREDUCTION_NATIVE=0
    turns it off: "auto" then uses SciPy and "native" says why it cannot run."""
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv("TOKENREDUCTION_CACHE", str(tmp_path))
    assert native.library() is not None
    assert len(list(tmp_path.glob("agglomerative-*.so"))) == 1
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv("TOKENREDUCTION_NATIVE", "0")
    assert native.library() is None
    d = cosine_distance(torch.randn(2, 20, 4))
    np.testing.assert_array_equal(agglomerative_labels(d, 8, "average").numpy(), _scipy(d, 8, "average"))
    with pytest.raises(RuntimeError, match="not available"):
        agglomerative_labels(d, 8, "average", backend="native")
    assert torch.equal(cosine_agglomerative_labels(torch.randn(1, 9, 3), 9, "single"), torch.arange(9)[None])
    monkeypatch.setattr(native, "_tried", False)  # rebuilt (cached) for the tests after this one
    monkeypatch.delenv("TOKENREDUCTION_NATIVE")


def test_the_c_file_is_what_is_built_and_keys_the_cache(tmp_path, monkeypatch):
    """The kernel is built from reduction/_native_clustering.c: an edit of
    that file gives another cached library; a missing file raises, naming it."""
    assert native.SOURCE_PATH.name == "_native_clustering.c" and native.SOURCE_PATH.is_file()
    monkeypatch.setenv("TOKENREDUCTION_CACHE", str(tmp_path))
    edited = tmp_path / "edited.c"
    edited.write_text(native.SOURCE_PATH.read_text() + "\nint tr_edited_marker(void) { return 7; }\n")
    built = []
    for path in (native.SOURCE_PATH, edited):
        monkeypatch.setattr(native, "SOURCE_PATH", path)
        monkeypatch.setattr(native, "_tried", False)
        monkeypatch.setattr(native, "_library", None)
        built.append(native.library())
    assert len(list(tmp_path.glob("agglomerative-*.so"))) == 2
    assert not hasattr(built[0], "tr_edited_marker") and built[1].tr_edited_marker() == 7
    monkeypatch.setattr(native, "SOURCE_PATH", tmp_path / "missing.c")
    monkeypatch.setattr(native, "_tried", False)
    with pytest.raises(RuntimeError, match="missing.c"):
        native.library()
    monkeypatch.setattr(native, "_tried", False)  # rebuilt (cached) for the tests after this one


def test_single_linkage_on_float32_equals_float64_and_scipy():
    """Single linkage on float32 input runs on a float32 work matrix (it only
    compares): the labels of the float64 path on the same values, and
    SciPy's, with many ties (a coarse grid, duplicated tokens) and without;
    a nan is still found and named."""
    g = torch.Generator().manual_seed(11)
    grid = (torch.rand(5, 60, 60, generator=g) * 6).round() / 4
    grid = (grid + grid.transpose(1, 2)) / 2
    tokens = torch.randn(5, 20, 6, generator=g)[:, torch.randint(0, 20, (60,), generator=g)]
    for d in (grid, cosine_distance(tokens), cosine_distance(torch.randn(5, 60, 6, generator=g))):
        for k in (1, 7, 30, 59):
            got = agglomerative_labels(d, k, "single", backend="native")
            assert torch.equal(got, agglomerative_labels(d.double(), k, "single", backend="native"))
            reference = (agglomerative_labels(d, k, "single", backend="scipy") if bool((d < 0).any())
                         else _scipy_first_merges(d, k, "single"))  # linkage refuses negative distances
            np.testing.assert_array_equal(got.numpy(), reference.numpy())
    bad = grid.clone()
    bad[3, 10, 40] = float("nan")
    with pytest.raises(ValueError, match="image 3"):
        agglomerative_labels(bad, 7, "single", backend="native")


def test_native_rejects_gpu_tensors_by_name():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(ValueError, match="CPU"):
        agglomerative_labels(torch.rand(1, 4, 4, device="cuda"), 2, "single", backend="native")


def test_forked_child_clusters_with_fresh_threads():
    """A pool started before fork() has no threads in the child; the child
    must not hang waiting for them (DataLoader workers fork)."""
    import multiprocessing as mp

    d = cosine_distance(torch.randn(4, 30, 4))
    expected = native.run(d, 10, "single", threads=2)  # the parent's pool exists now
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_cluster_in_child, (d,)).get(timeout=60)
    assert torch.equal(got, expected)


def _cluster_in_child(d):
    return native.run(d, 10, "single", threads=2)


# ------------------------------------------------------------------ sparse path (large N)


def _smooth_tokens(batch: int, h: int, w: int, channels: int, noise: float, seed: int) -> torch.Tensor:
    """(batch, h*w, channels) tokens of a smooth random field plus noise: like
    a diffusion UNet's hidden states, each token has a few close neighbours
    and the cut height of K = N/2 lies near its nearest-neighbour distance."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, channels, h // 8, w // 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = x + noise * torch.randn(batch, channels, h, w, generator=g)
    return x.flatten(2).transpose(1, 2).contiguous()


@pytest.mark.parametrize("method", ["complete", "average"])
def test_sparse_path_equals_scipy_and_the_dense_chain(method):
    """N=1024 (a 32 x 32 latent): the sparse greedy path clusters every
    image (the counts say so, with raised thresholds for the smaller K) and
    gives SciPy's partition, for cosine similarities (the fused path) and
    float32 and float64 distances, and the dense chain's labels."""
    x = _smooth_tokens(2, 32, 32, 16, 0.5, seed=21)
    d = cosine_distance(x)
    native.sparse_stats()
    raises = 0
    for k in (512, 400, 800):
        expected = _scipy_first_merges(d, k, method)
        labels = [cosine_agglomerative_labels(x, k, method),
                  agglomerative_labels(d, k, method, backend="native"),
                  agglomerative_labels(d.double(), k, method, backend="native")]
        stats = native.sparse_stats()
        assert stats["finished"] == 6 and stats["dense"] == 0, stats
        raises += stats["raises"]
        with native.dense_only():
            dense = agglomerative_labels(d, k, method, backend="native")
        assert native.sparse_stats()["finished"] == 0
        for got in labels:
            assert torch.equal(got, expected), f"K={k}"
        assert torch.equal(dense, expected)
    assert raises > 0  # K=400 lies above the first threshold


def test_sparse_path_hands_ties_to_the_dense_chain():
    """Points equidistant from two others (exact ties, where SciPy's chain
    order decides which pair merges): the sparse path sees the tie within
    its margin and the dense chain, SciPy's order, clusters the image."""
    x = _smooth_tokens(1, 32, 32, 16, 0.5, seed=22)
    d = cosine_distance(x).double()
    g = torch.Generator().manual_seed(3)
    dd = d[0].clone()
    dd.fill_diagonal_(float("inf"))
    for a in torch.randperm(1024, generator=g)[:40].tolist():
        order = dd[a].argsort()
        b, c = int(order[0]), int(order[1])
        d[0, a, c] = d[0, c, a] = d[0, a, b]  # a is as close to c as to its nearest neighbour b
    for method in ("complete", "average"):
        native.sparse_stats()
        labels = agglomerative_labels(d, 512, method, backend="native")
        stats = native.sparse_stats()
        assert stats["dense"] == 1 and stats["finished"] == 0, stats
        assert torch.equal(labels, _scipy_first_merges(d, 512, method))


def test_sparse_path_hands_dense_graphs_and_duplicates_to_the_chain():
    """Isotropic random tokens (every pair about as far apart: the graph
    below the threshold would be dense), duplicated tokens (zero distances)
    and integer-valued distances fall back to the dense chain; the labels
    stay SciPy's."""
    g = torch.Generator().manual_seed(23)
    iso = torch.randn(1, 1024, 256, generator=g)
    dup = _smooth_tokens(1, 32, 32, 8, 0.5, seed=24)
    dup[0, 100:160] = dup[0, 7]
    ints = torch.randint(1, 6, (1, 1024, 1024), generator=g).double()
    ints = ints + ints.transpose(1, 2)
    for method in ("complete", "average"):
        for x in (iso, dup):
            native.sparse_stats()
            labels = cosine_agglomerative_labels(x, 512, method)
            assert native.sparse_stats()["dense"] == 1
            assert torch.equal(labels, _scipy_first_merges(cosine_distance(x), 512, method))
        native.sparse_stats()
        labels = agglomerative_labels(ints, 400, method, backend="native")
        assert native.sparse_stats()["dense"] == 1
        assert torch.equal(labels, _scipy_first_merges(ints, 400, method))


def test_sparse_path_vector_and_portable_bands_agree():
    """The AVX2 and the portable threshold scans list the same pairs: the
    same labels and the same number of threshold raises; single linkage
    never takes the sparse path."""
    x = _smooth_tokens(1, 33, 35, 16, 0.5, seed=25)  # N=1155: row lengths leave vector tails
    native.sparse_stats()
    vector = cosine_agglomerative_labels(x, 400, "average")
    vector_stats = native.sparse_stats()
    with native.portable_only():
        portable = cosine_agglomerative_labels(x, 400, "average")
    assert native.sparse_stats() == vector_stats and vector_stats["finished"] == 1
    assert torch.equal(vector, portable)


def test_sparse_single_linkage_equals_scipy():
    """Single linkage at N >= 1024 unites the closest pairs below the
    threshold (Kruskal): SciPy's partition, also with duplicated tokens
    (zero distances below the cut) and for K that needs raised thresholds."""
    x = _smooth_tokens(2, 32, 32, 16, 0.5, seed=26)
    x[1, 50:60] = x[1, 3]
    d = cosine_distance(x)
    native.sparse_stats()
    for k in (300, 512, 900):
        assert torch.equal(cosine_agglomerative_labels(x, k, "single"), _scipy_first_merges(d, k, "single"))
    stats = native.sparse_stats()
    assert stats["finished"] == 6 and stats["raises"] > 0, stats


@pytest.mark.parametrize("method", LINKAGES)
def test_sparse_path_hands_a_tie_at_the_cut_to_the_dense_chain(method):
    """Two merges of equal height at the cut (SciPy's stable order decides
    which is in): made by moving the first merge left out, of two single
    points, down to the height of the last one taken. The sparse path sees
    the tie and the dense chain gives SciPy's partition."""
    for seed in (27, 28, 29, 30):  # without the check, some of these give other partitions
        x = _smooth_tokens(1, 32, 32, 16, 0.5, seed=seed)
        d = cosine_distance(x).double()
        n = d.shape[1]
        rows, cols = np.triu_indices(n, 1)
        z = linkage(d[0].numpy()[rows, cols], method=method)
        need = next(k for k in range(400, 700) if z[k, 0] < n and z[k, 1] < n and z[k, 2] > z[k - 1, 2])
        p, q = int(z[need, 0]), int(z[need, 1])
        d[0, p, q] = d[0, q, p] = z[need - 1, 2]
        native.sparse_stats()
        labels = agglomerative_labels(d, n - need, method, backend="native")
        assert native.sparse_stats()["dense"] == 1
        assert torch.equal(labels, _scipy_first_merges(d, n - need, method)), f"seed {seed}"

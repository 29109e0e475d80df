"""ATC: batched agglomerative clustering against SciPy and a dense reference,
and the ATC method inside a tiny ViT."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

import tokenreduction as tr
from tokenreduction.models.budget import StageBudget
from tokenreduction.reduction.atc import ATC, atc_merge, cosine_distance, pool_clusters
from tokenreduction.reduction.base import BlockFeatures
from tokenreduction.reduction import _native_clustering
from tokenreduction.reduction.clustering import agglomerative_labels
from tokenreduction.reduction.ops import pool_by_assignment

LINKAGES = ["single", "complete", "average"]


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Name every cluster by its smallest member index."""
    labels = np.asarray(labels)
    out = np.empty(len(labels), dtype=np.int64)
    for value in np.unique(labels):
        members = np.nonzero(labels == value)[0]
        out[members] = members.min()
    return out


def _scipy_labels(distance: np.ndarray, k: int, method: str) -> np.ndarray:
    n = distance.shape[0]
    if k >= n:
        return np.arange(n)
    z = linkage(squareform(distance, checks=False), method=method)
    return _canonical(fcluster(z, k, criterion="maxclust"))


def _agglomerative_labels_dense(distance: torch.Tensor, k: int, method: str) -> torch.Tensor:
    """Obviously correct reference: per image, repeatedly merge the closest
    pair of active clusters found by a full search, Lance-Williams update."""
    B, N, _ = distance.shape
    out = torch.empty(B, N, dtype=torch.long)
    for b in range(B):
        d = distance[b].double().clone()
        d.fill_diagonal_(float("inf"))
        size = torch.ones(N, dtype=torch.float64)
        labels = torch.arange(N)
        active = torch.ones(N, dtype=torch.bool)
        for _ in range(N - min(k, N)):
            masked = d.clone()
            masked[~active] = float("inf")
            masked[:, ~active] = float("inf")
            flat = int(masked.argmin())
            i, j = sorted((flat // N, flat % N))
            if method == "single":
                new = torch.minimum(d[i], d[j])
            elif method == "complete":
                new = torch.maximum(d[i], d[j])
            else:
                new = (size[i] * d[i] + size[j] * d[j]) / (size[i] + size[j])
            d[i], d[:, i] = new, new
            d[i, i] = float("inf")
            size[i] += size[j]
            active[j] = False
            labels[labels == j] = i
        out[b] = labels
    return out


def _random_distances(B: int, N: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(B, N, 6, generator=g, dtype=torch.float64)
    return torch.cdist(points, points).to(dtype)


BACKENDS = ["scipy", "rnn"]
if _native_clustering.library() is not None:  # the compiled kernel needs a C compiler
    BACKENDS.append("native")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", LINKAGES)
@pytest.mark.parametrize("N", [10, 37, 64])
def test_labels_equal_scipy(method, N, backend):
    for seed, k in enumerate(sorted({1, 2, 5, N // 3, N - 1, N})):
        distance = _random_distances(4, N, seed=100 * N + seed)
        labels = agglomerative_labels(distance, k, method, backend=backend)
        assert labels.shape == (4, N) and labels.dtype == torch.long
        for b in range(4):
            expected = _scipy_labels(distance[b].numpy(), k, method)
            np.testing.assert_array_equal(labels[b].numpy(), expected, err_msg=f"{method} N={N} K={k} image {b}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", LINKAGES)
def test_labels_equal_dense_reference(method, backend):
    distance = _random_distances(3, 23, seed=7)
    for k in (1, 4, 11, 22):
        expected = _agglomerative_labels_dense(distance, k, method)
        assert torch.equal(agglomerative_labels(distance, k, method, backend=backend), expected)


@pytest.mark.parametrize("method", LINKAGES)
def test_rnn_rounds_at_study_size_match_scipy(method):
    """The batched rounds at ATC's size (N=196, K=137): many pairs per
    round, pairs of one round that are each other's neighbours' clusters,
    merges beyond the cut that must be left out."""
    g = torch.Generator().manual_seed(19)
    metric = torch.randn(6, 196, 64, generator=g, dtype=torch.float64)
    distance = cosine_distance(metric)
    assert distance.dtype == torch.float64
    labels = agglomerative_labels(distance, 137, method, backend="rnn")
    assert torch.equal(labels, agglomerative_labels(distance, 137, method, backend="scipy"))
    for b in range(6):
        np.testing.assert_array_equal(labels[b].numpy(), _scipy_labels(distance[b].numpy(), 137, method))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", LINKAGES)
def test_tied_inputs_match_scipy(method, backend):
    """Exact ties: duplicated tokens (distance 0 within a group) and coarsely
    quantised distances elsewhere; where the cut is unambiguous (K at most
    the number of distinct tokens) the partition is SciPy's."""
    g = torch.Generator().manual_seed(23)
    base = torch.randn(3, 12, 5, generator=g, dtype=torch.float64)
    metric = base.repeat_interleave(3, dim=1)[:, torch.randperm(36, generator=g)]  # 12 groups of 3 identical tokens
    distance = cosine_distance(metric).clamp_min(0.0)  # SciPy rejects -1e-16
    for k in (12, 7, 3):
        labels = agglomerative_labels(distance, k, method, backend=backend)
        _assert_valid_partition(labels, k)
        for b in range(3):
            np.testing.assert_array_equal(labels[b].numpy(), _scipy_labels(distance[b].numpy(), k, method))
    # integer-valued distances: many equal merge heights; still exactly K clusters
    points = torch.randint(0, 4, (2, 30, 2), generator=g).double()
    tied = torch.cdist(points, points, p=1)
    for k in (25, 10, 4):
        _assert_valid_partition(agglomerative_labels(tied, k, method, backend=backend), k)


def test_labels_from_merges():
    from tokenreduction.reduction.clustering import labels_from_merges

    # 5 points: merge (3, 4) -> node 5, then (1, 5) -> node 6, then (0, 2) -> node 7
    merges = torch.tensor([[[3, 4], [1, 5], [0, 2]]])
    assert labels_from_merges(merges[:, :1], 5).tolist() == [[0, 1, 2, 3, 3]]
    assert labels_from_merges(merges[:, :2], 5).tolist() == [[0, 1, 2, 1, 1]]
    assert labels_from_merges(merges, 5).tolist() == [[0, 1, 0, 1, 1]]


@pytest.mark.parametrize("method", LINKAGES)
def test_float32_cosine_distances_match_scipy(method):
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(4, 50, 16, generator=g)
    distance = cosine_distance(metric)
    assert distance.dtype == torch.float32
    labels = agglomerative_labels(distance, 20, method)
    assert torch.equal(labels, agglomerative_labels(distance, 20, method, backend="rnn"))
    for b in range(4):
        expected = _scipy_labels(distance[b].double().numpy(), 20, method)
        np.testing.assert_array_equal(labels[b].numpy(), expected)


def _assert_valid_partition(labels: torch.Tensor, k: int) -> None:
    B, N = labels.shape
    idx = torch.arange(N).expand(B, N)
    assert bool((labels <= idx).all()) and bool((labels >= 0).all())
    assert torch.equal(labels.gather(1, labels), labels)  # every name is a member of its cluster
    for b in range(B):
        assert labels[b].unique().numel() == min(k, N)


@pytest.mark.parametrize("method", LINKAGES)
def test_ties_and_bfloat16_give_valid_partitions(method):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 8, 4, generator=g)
    metric = base.repeat_interleave(4, dim=1)  # groups of identical tokens: exact ties
    labels = agglomerative_labels(cosine_distance(metric), 8, method)
    _assert_valid_partition(labels, 8)
    # identical tokens end up together when K equals the number of groups
    groups = torch.arange(32) // 4
    for b in range(3):
        assert labels[b].unique().numel() == 8
        np.testing.assert_array_equal(_canonical(groups.numpy()), _canonical(labels[b].numpy()))
    metric16 = torch.randn(2, 30, 8, generator=g).to(torch.bfloat16)
    distance16 = 1 - torch.nn.functional.normalize(metric16, dim=-1) @ torch.nn.functional.normalize(
        metric16, dim=-1
    ).transpose(1, 2)
    assert distance16.dtype == torch.bfloat16
    labels16 = agglomerative_labels(distance16, 9, method)
    _assert_valid_partition(labels16, 9)
    assert torch.equal(labels16, agglomerative_labels(distance16.float(), 9, method))
    _assert_valid_partition(agglomerative_labels(distance16, 9, method, backend="rnn"), 9)
    _assert_valid_partition(agglomerative_labels(cosine_distance(metric), 8, method, backend="rnn"), 8)


def test_bad_arguments():
    d = _random_distances(1, 5, seed=0)
    with pytest.raises(ValueError, match="single, complete, average"):
        agglomerative_labels(d, 2, "ward")
    with pytest.raises(ValueError, match="num_clusters"):
        agglomerative_labels(d, 0, "single")
    with pytest.raises(ValueError, match=r"\(B, N, N\)"):
        agglomerative_labels(d[0], 2, "single")
    with pytest.raises(ValueError, match="backend"):
        agglomerative_labels(d, 2, "single", backend="sklearn")
    bad = d.clone()
    bad[0, 1, 3] = bad[0, 3, 1] = float("nan")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="finite"):
            agglomerative_labels(bad, 1, "average", backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", LINKAGES)
def test_cuda_matches_cpu(method):
    distance = _random_distances(4, 64, seed=11, dtype=torch.float32)
    assert torch.equal(agglomerative_labels(distance.cuda(), 20, method).cpu(), agglomerative_labels(distance, 20, method))


# --- the method --------------------------------------------------------------------------------


def test_atc_merge_is_size_weighted_cluster_mean_with_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 5, generator=g, requires_grad=True)
    size = torch.randint(1, 4, (2, 12), generator=g).float()
    metric = torch.randn(2, 12, 3, generator=g)
    out = atc_merge(x, size, metric, 4, "complete")
    labels = agglomerative_labels(cosine_distance(metric), 4, "complete")
    assert out.x.shape == (2, 4, 5) and out.assignment.shape == (2, 12)
    assert torch.allclose(out.size.sum(1), size.sum(1))
    for b in range(2):
        names = labels[b].unique()  # sorted: output m is the cluster named names[m]
        for m, name in enumerate(names.tolist()):
            members = labels[b] == name
            assert bool((out.assignment[b][members] == m).all())
            w = size[b][members]
            expected = (x[b][members] * w[:, None]).sum(0) / w.sum()
            assert torch.allclose(out.x[b, m], expected, atol=1e-6)
            assert out.size[b, m] == w.sum()
    out.x.sum().backward()
    total = torch.zeros(2, 4).scatter_add_(1, out.assignment, size)
    expected_grad = (size / total.gather(1, out.assignment))[..., None].expand_as(x)
    assert torch.allclose(x.grad, expected_grad, atol=1e-6)


def _slow_pool(x, assignment, num_out, weight):
    """Per image and output slot: the weighted mean of its members, in float64."""
    B, N, C = x.shape
    pooled = torch.zeros(B, num_out, C, dtype=torch.float64)
    total = torch.zeros(B, num_out, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            m = int(assignment[b, n])
            pooled[b, m] += float(weight[b, n]) * x[b, n].double()
            total[b, m] += float(weight[b, n])
    return pooled / total[..., None], total


@pytest.mark.parametrize("layout", ["contiguous", "prefix_sliced", "channels_strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pool_clusters_equals_slow_mean_and_scatter_pooling(layout, dtype):
    """pool_clusters gives the weighted cluster means (a slow loop), the same
    values as the scatter pooling it replaced (bit for bit in float64 here:
    members are summed in index order either way), for the patch tokens
    sliced off a model's tokens (read in place) and for other strides, and
    the same gradients in x and in the weights."""
    g = torch.Generator().manual_seed(3)
    B, N, C, M = 3, 40, 6, 11
    assignment = torch.stack([torch.cat([torch.arange(M), torch.randint(0, M, (N - M,), generator=g)])
                              [torch.randperm(N, generator=g)] for _ in range(B)])
    weight = torch.randint(1, 5, (B, N), generator=g).to(dtype)
    base = torch.randn(B, N + 2, C, generator=g, dtype=dtype)
    if layout == "contiguous":
        x = base[:, :N].contiguous()
    elif layout == "prefix_sliced":
        x = base[:, 2:]
        assert not x.is_contiguous()
    else:
        x = base[:, :N].transpose(1, 2).contiguous().transpose(1, 2)
    x = x.detach().requires_grad_()
    w = weight.clone().requires_grad_()
    pooled, total = pool_clusters(x, assignment, M, w)
    slow, slow_total = _slow_pool(x.detach(), assignment, M, weight)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(pooled.double(), slow, rtol=tol, atol=tol)
    assert torch.equal(total.double(), slow_total)
    ref_x = x.detach().clone().requires_grad_()
    ref_w = weight.clone().requires_grad_()
    ref, ref_total = pool_by_assignment(ref_x, assignment, M, weight=ref_w)
    if dtype == torch.float64:
        assert torch.equal(pooled, ref)
    grad = torch.randn(B, M, C, generator=g, dtype=dtype)
    (pooled * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=tol, atol=tol)


def _tiny(**kwargs):
    return tr.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=5,
        method="atc", **kwargs,
    ).eval()


@pytest.mark.parametrize("method", LINKAGES)
def test_atc_in_model_keep_rate(method):
    model = _tiny(keep_rate=0.7, method_kwargs={"linkage": method})
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (3, 5)
    assert model.tokens_kept == [44, 31, 21] == model.reduction_config["expected_tokens"]
    ctx = model.reduction_state
    assert torch.allclose(ctx.size[:, 1:].sum(1), torch.full((3,), 64.0))  # sizes conserved
    assert ctx.size.shape[1] == 1 + 21
    assert model.blocks[3].reduction.linkage == method
    for stage in ctx.stages:
        assert stage.kind == "merge"
        assert int(stage.assignment.max()) == stage.tokens_out - 1


def test_atc_r_budget_removes_exactly_r_per_block():
    model = _tiny(r=3)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.tokens_kept == [64 - 3 * (b + 1) for b in range(12)]
    assert torch.allclose(model.reduction_state.size[:, 1:].sum(1), torch.full((2,), 64.0))


def test_atc_gradient_reaches_the_input():
    model = _tiny(keep_rate=0.5)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(images).square().sum().backward()
    assert images.grad is not None and bool(torch.isfinite(images.grad).all())
    assert float(images.grad.abs().sum()) > 0


def test_atc_bfloat16_forward():
    x = torch.randn(2, 20, 8).to(torch.bfloat16)
    metric = torch.randn(2, 20, 4).to(torch.bfloat16)
    size = torch.ones(2, 20, dtype=torch.bfloat16)
    out = ATC(dim=8, linkage="single")(x, size, BlockFeatures(metric=metric), StageBudget(target=7, r=13))
    assert out.x.dtype == torch.bfloat16 and out.x.shape == (2, 7, 8)
    assert torch.equal(out.size.float().sum(1), torch.full((2,), 20.0))
    assert sorted(out.assignment[0].unique().tolist()) == list(range(7))


def test_unknown_linkage_fails_at_construction():
    with pytest.raises(ValueError, match="ward"):
        _tiny(keep_rate=0.7, method_kwargs={"linkage": "ward"})
    with pytest.raises(ValueError, match="unknown options"):
        _tiny(keep_rate=0.7, method_kwargs={"linkages": "single"})

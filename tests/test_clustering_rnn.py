"""The tensor back end "rnn" (used for CUDA tensors), forced on the CPU: it
gives SciPy's partition on the golden ATC inputs, at study size, on exact
ties and on near-ties (those go to the exact path), and it synchronises with
the host at most ``rnn_sync_bound(N)`` times per call, never once per round."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import linkage
from torch.overrides import TorchFunctionMode

from tokenreduction.reduction import clustering
from tokenreduction.reduction.atc import cosine_distance
from tokenreduction.reduction.clustering import agglomerative_labels, rnn_stats, rnn_sync_bound

LINKAGES = ["single", "complete", "average"]
REPO = Path(__file__).resolve().parents[1]
GOLDEN = [REPO / "tests" / "fixtures" / "golden" / "atc.npz"]
_shared = Path(os.environ.get("TOKENREDUCTION_GOLDEN", REPO.parent / "shared" / "golden")) / "atc.npz"
if _shared.exists():
    GOLDEN.append(_shared)


@pytest.fixture(autouse=True)
def _fresh_counts(one_thread):
    rnn_stats()  # reset the counts


def _scipy(distance: torch.Tensor, k: int, method: str) -> torch.Tensor:
    """The partition of the first N - k merges of SciPy's ``linkage`` per
    image, each cluster named by its smallest member; the "scipy" back end
    (SciPy's dendrogram routine without linkage's checks) where cosine
    distances of equal tokens are below 0."""
    if bool((distance < 0).any()):
        return agglomerative_labels(distance, k, method, backend="scipy")
    n = distance.shape[1]
    rows, cols = np.triu_indices(n, k=1)
    merges = np.stack([linkage(d[rows, cols], method=method)[:n - k, :2] for d in distance.double().numpy()])
    return clustering.labels_from_merges(torch.from_numpy(merges.astype(np.int64)), n)


def _golden_cases():
    for path in GOLDEN:
        d = np.load(path)
        for i in range(int(d["n_cases"])):
            params = json.loads(str(d[f"c{i}_params"]))
            yield pytest.param(d[f"c{i}_metric"], d[f"c{i}_assign"], params, id=f"{path.parent.name}-{i}")


@pytest.mark.parametrize("metric, assign, params", list(_golden_cases()))
def test_rnn_gives_the_golden_partitions(metric, assign, params):
    pre = int(params["class_token"])
    distance = cosine_distance(torch.from_numpy(metric[:, pre:]))  # float64, as the reference
    k = int(params["num_clusters_effective"])
    labels = agglomerative_labels(distance, k, params["linkage"], backend="rnn")
    assert torch.equal(labels, _scipy(distance, k, params["linkage"]))
    golden = torch.from_numpy(assign[:, pre:]).long()
    for b in range(labels.shape[0]):  # the same partition as the reference's labels
        pairs = set(zip(labels[b].tolist(), golden[b].tolist()))
        assert len(pairs) == len(set(labels[b].tolist())) == len(set(golden[b].tolist()))


@pytest.mark.parametrize("method", LINKAGES)
def test_rnn_decides_random_study_size_images_itself(method):
    """float32 cosine distances at N=196, K=137: SciPy's partitions, and no
    image needed the exact path (the rounds do the work)."""
    metric = torch.randn(8, 196, 64, generator=torch.Generator().manual_seed(1))
    distance = cosine_distance(metric)
    labels = agglomerative_labels(distance, 137, method, backend="rnn")
    assert torch.equal(labels, _scipy(distance, 137, method))
    assert rnn_stats() == {"images": 8, "exact": 0}


@pytest.mark.parametrize("method", LINKAGES)
def test_rnn_exact_ties_go_to_the_exact_path(method):
    """Duplicated tokens and distances on a coarse grid (many equal values):
    SciPy's tie-breaking, through the exact path."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(4, 12, 8, generator=g)
    metric = tokens[:, torch.randint(0, 12, (40,), generator=g)]  # 40 tokens, 12 distinct
    grid = (torch.rand(4, 40, 40, generator=g) * 4).round()
    grid = (grid + grid.transpose(1, 2)) / 2
    for distance, k in ((cosine_distance(metric), 15), (grid, 9)):
        labels = agglomerative_labels(distance, k, method, backend="rnn")
        assert torch.equal(labels, _scipy(distance, k, method))
        assert rnn_stats()["exact"] > 0


@pytest.mark.parametrize("method", LINKAGES)
def test_rnn_near_ties_give_scipys_partition(method):
    """Distances that differ from tied ones by a relative 1e-13 (far below
    float32 resolution, within the margin): SciPy's partition."""
    g = torch.Generator().manual_seed(3)
    base = (torch.rand(6, 30, 30, generator=g, dtype=torch.float64) * 3).round() + 1
    noise = torch.rand(6, 30, 30, generator=g, dtype=torch.float64) * 1e-13
    distance = base + noise
    distance = (distance + distance.transpose(1, 2)) / 2
    labels = agglomerative_labels(distance, 11, method, backend="rnn")
    assert torch.equal(labels, _scipy(distance, 11, method))
    assert rnn_stats()["exact"] > 0


def test_rnn_non_finite_entries_name_the_image():
    distance = cosine_distance(torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(4)))
    distance[2, 3, 7] = float("nan")
    with pytest.raises(ValueError, match="image 2"):
        agglomerative_labels(distance, 4, "average", backend="rnn")
    distance[2, 3, 7] = 0.5
    distance[1, 7, 3] = float("inf")  # below the diagonal: not read, as SciPy
    distance[1].diagonal().fill_(float("nan"))  # the diagonal is ignored
    assert torch.equal(agglomerative_labels(distance, 4, "average", backend="rnn"),
                       _scipy(distance, 4, "average"))


class SyncCounter(TorchFunctionMode):
    """Counts the calls that make a CUDA tensor's host wait (reads of values,
    data-dependent shapes, device transfers), as they would run on a GPU."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal", "cpu",
             "numpy", "unique", "unique_consecutive", "masked_select", "repeat_interleave", "nonzero_static"}

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        syncs = name in self.READS
        if name == "to" and (kwargs.get("device") is not None
                             or any(isinstance(a, (torch.device, str)) for a in args[1:])):
            syncs = True  # a transfer
        if name == "tensor" and kwargs.get("device") is not None:
            syncs = True  # a host list copied to the device
        if name in ("__getitem__", "__setitem__") and len(args) > 1 and isinstance(args[1], torch.Tensor) \
                and args[1].dtype == torch.bool:
            syncs = True  # boolean indexing: a data-dependent shape
        if syncs:
            self.calls.append(name)
        return func(*args, **kwargs)


def _chain(n: int) -> torch.Tensor:
    """Points on a line with growing gaps: under single linkage one
    reciprocal pair per round, so clustering them into one cluster takes
    n - 1 rounds."""
    gaps = 1.0 + 0.01 * torch.arange(n - 1, dtype=torch.float64)
    x = torch.cat([torch.zeros(1, dtype=torch.float64), gaps.cumsum(0)])
    return (x[:, None] - x[None, :]).abs().expand(2, n, n).contiguous()


@pytest.mark.parametrize("n", [40, 64])
@pytest.mark.parametrize("method", LINKAGES)
def test_rnn_host_syncs_are_bounded_not_per_round(method, n):
    """Single linkage on the chain takes n - 1 rounds (39: past the last
    power-of-two check; 63), yet at most rnn_sync_bound(n) = 11 syncs: a
    sync added inside the round loop would make n - 1 or more. The other
    linkages take fewer rounds there, within the same bound. With an image
    sent to the exact path the bound still holds."""
    distance = _chain(n)
    rounds = []
    original = clustering._lance_williams

    def counting(*args, **kwargs):
        rounds.append(1)
        return original(*args, **kwargs)

    clustering._lance_williams = counting
    try:
        with SyncCounter() as counter:
            labels = clustering._rnn_labels(distance, n - 1, method)
    finally:
        clustering._lance_williams = original
    assert torch.equal(labels, torch.zeros(2, n, dtype=torch.long))
    assert len(rounds) >= (n - 1 if method == "single" else 8)
    assert 1 <= len(counter.calls) <= rnn_sync_bound(n) == 11, counter.calls
    assert rnn_stats() == {"images": 2, "exact": 0}

    tied = distance.clone()
    tied[1] = (tied[1] * 2).round()  # ties: image 1 goes to the exact path
    with SyncCounter() as counter:
        labels = clustering._rnn_labels(tied, n - 20, method)
    assert torch.equal(labels, _scipy(tied, 20, method))
    assert rnn_stats()["exact"] == 1
    assert len(counter.calls) <= rnn_sync_bound(n), counter.calls


def test_rnn_equals_scipy_on_tie_heavy_random_inputs():
    """Small random cases, many with ties (integer grids, rounded points,
    float16): always the "scipy" back end's labels."""
    g = torch.Generator().manual_seed(5)
    for trial in range(24):
        B, N = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 30, (1,), generator=g))
        k = int(torch.randint(1, N + 1, (1,), generator=g))
        if trial % 3 == 0:
            points = torch.randn(B, N, 3, generator=g).round()
            distance = torch.cdist(points, points)
        else:
            distance = torch.rand(B, N, N, generator=g)
            distance = (distance * 3).round() if trial % 3 == 1 else distance.half()
            distance = (distance + distance.transpose(1, 2)) / 2
        for method in LINKAGES:
            assert torch.equal(agglomerative_labels(distance, k, method, backend="rnn"),
                               agglomerative_labels(distance, k, method, backend="scipy")), (trial, method)

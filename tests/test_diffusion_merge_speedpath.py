"""The SD merge closures (row-wise index_add / index_select) against the
plain definitions, and ATC's SD partitions against SciPy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from tokenreduction.diffusion.merge import atc_assignment, cosine_distance, merge_closures


def _random_assignment(B: int, N: int, M: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    assignment = torch.randint(0, M, (B, N), generator=g)
    assignment[:, :M] = torch.randperm(M, generator=g)  # every slot receives a token
    return assignment


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_is_the_mean_and_unmerge_copies(dtype):
    B, N, M, C = 3, 40, 17, 6
    assignment = _random_assignment(B, N, M, seed=1)
    merge, unmerge = merge_closures(assignment, M)
    x = torch.randn(B, N, C, dtype=torch.float64).to(dtype)
    merged = merge(x)
    assert merged.shape == (B, M, C) and merged.dtype == dtype
    for b in range(B):
        for m in range(M):
            expected = x[b][assignment[b] == m].double().mean(0)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(merged[b, m].double(), expected, rtol=tol, atol=tol)
    y = torch.randn(B, M, C, dtype=torch.float64).to(dtype)
    back = unmerge(y)
    assert back.shape == (B, N, C)
    assert torch.equal(back, torch.stack([y[b, assignment[b]] for b in range(B)]))
    with pytest.raises(ValueError, match="merge expects"):
        merge(x[:, :-1])
    with pytest.raises(ValueError, match="unmerge expects"):
        unmerge(y[:, :-1])


def test_merge_keeps_gradients():
    assignment = _random_assignment(2, 12, 5, seed=2)
    merge, unmerge = merge_closures(assignment, 5)
    x = torch.randn(2, 12, 3, requires_grad=True)
    unmerge(merge(x)).sum().backward()
    counts = torch.zeros(2, 5).scatter_add_(1, assignment, torch.ones(2, 12))
    # d/dx_n of sum over tokens of their slot's mean = count(slot) * 1 / count(slot) = 1
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    assert bool((counts > 0).all())


@pytest.mark.parametrize("linkage_name", ["single", "complete", "average"])
def test_atc_sd_partition_equals_scipy(linkage_name):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 64, 8, generator=g)  # an 8 x 8 latent's tokens
    assignment, num_out = atc_assignment(hidden, 32, linkage_name)
    assert num_out == 32 and assignment.shape == (2, 64)
    distance = cosine_distance(hidden).double().numpy()
    rows, cols = np.triu_indices(64, k=1)
    for b in range(2):
        expected = fcluster(linkage(distance[b][rows, cols], method=linkage_name), 32, criterion="maxclust")
        ours = assignment[b].numpy()
        # same partition: two tokens share a cluster in one iff in the other
        np.testing.assert_array_equal(ours[:, None] == ours[None, :], expected[:, None] == expected[None, :])

"""Analysis of the "Which Tokens to Use?" study: CLS-feature similarity,
reduction-pattern agreement, token-depth heatmaps and their comparison,
correlation with the accuracy gap, and the drivers the analysis rules call.

Pure numpy functions (torch tensors are accepted and converted)."""
from .compare import (
    align_images,
    compare_features,
    compare_patterns,
    load_npz,
    pairs,
    token_statistics,
)
# the correlation function is analysis.correlate.correlate (the submodule
# keeps its name, as analysis.similarity does).
# heatmaps.similarity (SIM) is exported as histogram_intersection: the name
# `similarity` is the submodule of the feature metrics.
from .heatmaps import emd, heatmap_metrics, histogram_intersection, jsd, kld, pearson_cc, spearman_cc
from .patterns import (
    cluster_agreement,
    count_tokens,
    kept_from_centres,
    kept_iou,
    kept_patches,
    token_depth_from_kept,
    token_depth_map,
)
from .similarity import (
    cca_correlations,
    feature_similarities,
    lin_cka_dist,
    lin_cka_prime_dist,
    mean_cca_corr,
    mean_sq_cca_corr,
    preprocess,
    procrustes_dist,
    pwcca_dist,
)

__all__ = [
    "align_images", "cca_correlations", "cluster_agreement", "compare_features", "compare_patterns",
    "count_tokens", "emd", "feature_similarities", "heatmap_metrics", "jsd", "kept_iou",
    "kept_from_centres", "kept_patches", "kld", "lin_cka_dist", "lin_cka_prime_dist", "load_npz", "mean_cca_corr",
    "mean_sq_cca_corr", "pairs", "pearson_cc", "preprocess", "procrustes_dist", "pwcca_dist",
    "histogram_intersection", "spearman_cc", "token_depth_from_kept", "token_depth_map", "token_statistics",
]

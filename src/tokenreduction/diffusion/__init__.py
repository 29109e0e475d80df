"""Stable Diffusion with token merging (ToMe for SD, ATC), scored by FID.

* :mod:`.merge`: pure merge functions (2-D strided bipartite matching, ATC
  agglomerative clustering) returning merge/unmerge closures.
* :mod:`.patch`: :func:`apply_patch` / :func:`remove_patch` add merging to a
  diffusers UNet or pipeline by hooks around the transformer blocks' attention
  and MLP; diffusers' own block code runs unchanged.
* :mod:`.pipeline`: the tiny random-weight demo pipeline, loading through
  ``from_pretrained``, and the study's generation protocol with timing.
* :mod:`.reference`: class names and the FID reference set from class folders.
* :mod:`.fid`: clean-fid FID with Inception weights from a file, or the
  demo's download-free pixel extractor; the FID table.

diffusers, transformers and clean-fid are imported only when used.
"""
from .fid import MissingWeightsError, PixelFeatures, compute_fid, fid_table
from .merge import MERGE_FUNCTIONS, atc_assignment, bipartite_grid_assignment, compute_merge, merge_closures
from .patch import MergeOptions, apply_patch, patch_state, remove_patch, reseed
from .pipeline import PROMPT, build_tiny_pipeline, generate_images, load_pipeline, save_tiny_pipeline
from .reference import class_names, make_reference_set

__all__ = [
    "MERGE_FUNCTIONS", "MergeOptions", "MissingWeightsError", "PROMPT", "PixelFeatures", "apply_patch",
    "atc_assignment", "bipartite_grid_assignment", "build_tiny_pipeline", "class_names", "compute_fid",
    "compute_merge", "fid_table", "generate_images", "load_pipeline", "make_reference_set", "merge_closures",
    "patch_state", "remove_patch", "reseed", "save_tiny_pipeline",
]

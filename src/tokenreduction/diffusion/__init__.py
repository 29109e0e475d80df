"""Diffusion models with token merging (ToMe for SD, ATC), scored by FID:
SD 1.x/2.x and SDXL UNets, PixArt and DiT transformers (docs/diffusion.md).

* :mod:`.merge`: pure merge functions (2-D strided bipartite matching, ATC
  agglomerative clustering) returning merge/unmerge closures.
* :mod:`.patch`: :func:`apply_patch` / :func:`remove_patch` add merging to a
  diffusers UNet, DiT-style transformer or pipeline by hooks around the
  transformer blocks' attention and MLP; diffusers' own block code runs
  unchanged.
* :mod:`.tiny`: tiny random-weight stand-ins of each supported model.
* :mod:`.pipeline`: loading through ``from_pretrained`` (``model`` sd15 /
  sdxl / pixart), and the study's generation protocol with timing.
* :mod:`.reference`: class names and the FID reference set from class folders.
* :mod:`.fid`: clean-fid FID with Inception weights from a file, or the
  demo's download-free pixel extractor; the FID table.

diffusers, transformers and clean-fid are imported only when used.
"""
from .fid import MissingWeightsError, PixelFeatures, compute_fid, fid_table
from .merge import MERGE_FUNCTIONS, atc_assignment, bipartite_grid_assignment, compute_merge, merge_closures
from .patch import MergeOptions, NothingMergedWarning, apply_patch, patch_state, remove_patch, reseed
from .pipeline import MODELS, PROMPT, build_tiny_pipeline, generate_images, load_pipeline, save_tiny_pipeline
from .reference import class_names, make_reference_set

__all__ = [
    "MERGE_FUNCTIONS", "MODELS", "MergeOptions", "MissingWeightsError", "NothingMergedWarning", "PROMPT", "PixelFeatures", "apply_patch",
    "atc_assignment", "bipartite_grid_assignment", "build_tiny_pipeline", "class_names", "compute_fid",
    "compute_merge", "fid_table", "generate_images", "load_pipeline", "make_reference_set", "merge_closures",
    "patch_state", "remove_patch", "reseed", "save_tiny_pipeline",
]

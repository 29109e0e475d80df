"""The rehearsal: a study's whole DAG on a CPU, on stand-ins (``snakemake
--configfile config/<study>.yaml --config rehearse=true``).

* :mod:`.standin`: the config rewrite (standard library only; loaded by the
  workflow at DAG build) -- :func:`standin_config`;
* :mod:`.fabricate`: the writers of the stand-in data sets and weights, each
  in its real on-disk format -- ``fabricate_<kind>``, :func:`fabricate`;
* :mod:`.detection_checkpoint`: the ViT-Adapter 3x checkpoint stand-in in
  mmdet's format, run by the detection environment (``python -m``).
"""
from .standin import RehearsalError, is_current, rehearsal_results, standin_config

__all__ = ["RehearsalError", "is_current", "rehearsal_results", "standin_config"]

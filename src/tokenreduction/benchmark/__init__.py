"""Speed and memory measured side by side: model throughput against the
unreduced baseline, FLOPs-implied against achieved speed-up, and the
clustering back ends of ATC checked against SciPy."""
from .clustering import BACKENDS, Backend, ClusteringInput, agreement, benchmark_clustering, canonical_labels
from .flops import model_flops, speed_table
from .specs import BASELINE, ModelSpec, specs_from_config
from .throughput import benchmark_throughput, build_models, peak_memory
from .timing import interleaved_times, num_thrown_out, paired_ratio, summarize

__all__ = [
    "BACKENDS", "BASELINE", "Backend", "ClusteringInput", "ModelSpec", "agreement", "benchmark_clustering",
    "benchmark_throughput", "build_models", "canonical_labels", "interleaved_times", "model_flops",
    "num_thrown_out", "paired_ratio", "peak_memory", "speed_table", "specs_from_config", "summarize",
]

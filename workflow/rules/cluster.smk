# Cluster checks, and (cluster_common.smk) the plan printed at DAG build
# under a cluster profile.


include: "cluster_common.smk"


# Cluster checks. Not part of rule all: the FIRST step on a cluster, once
# after installing a site profile, to see which GPUs a job gets and that CUDA
# is usable there (it fails, naming node, devices, torch and driver, if not):
#   snakemake --profile slurm gpu_smoke
#   snakemake --profile slurm gpu_smoke --set-resources gpu_smoke:gpu=2
# It fails (and writes no report) where the job's GPU is not usable, with the
# message every GPU job would give (tokenreduction/train/runtime.py).


rule gpu_smoke:
    output:
        report=f"{RESULTS}/cluster/gpu_smoke.txt",
    log:
        f"{RESULTS}/logs/gpu_smoke.log",
    benchmark:
        f"{RESULTS}/benchmarks/gpu_smoke/gpu_smoke.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=2000,
        runtime=10,
    shell:
        "( echo host=$(hostname) slurm_job=${{SLURM_JOB_ID:-none}}"
        " slurm_job_gpus=${{SLURM_JOB_GPUS:-none}}"
        " CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-unset}};"
        " nvidia-smi -L 2>/dev/null || echo 'nvidia-smi: not available';"
        ' "$TOKENREDUCTION_PYTHON" -c "import torch; n = torch.cuda.device_count();'
        " print('torch', torch.__version__, 'sees', n, 'CUDA device(s)',"
        ' [torch.cuda.get_device_name(i) for i in range(n)])"'
        " ) > {output.report:q}.tmp 2> {log:q}; cat {output.report:q}.tmp;"
        ' "$TOKENREDUCTION_PYTHON" -c "import sys; from tokenreduction.train.runtime import'
        " CudaUnavailableError, resolve_device, cuda_environment;\n"
        "try: print('usable:', resolve_device('cuda'), cuda_environment())\n"
        'except CudaUnavailableError as err: sys.exit(str(err))" >> {output.report:q}.tmp 2>> {log:q}'
        " || {{ cat {log:q} >&2; exit 1; }};"
        " tail -n 1 {output.report:q}.tmp; mv {output.report:q}.tmp {output.report:q}"

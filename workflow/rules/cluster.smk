# Cluster checks. Not part of rule all: run it once after installing a site
# profile to see which GPUs a job gets:
#   snakemake --profile slurm gpu_smoke
#   snakemake --profile slurm gpu_smoke --set-resources gpu_smoke:gpu=2


rule gpu_smoke:
    output:
        report=f"{RESULTS}/cluster/gpu_smoke.txt",
    log:
        f"{RESULTS}/logs/gpu_smoke.log",
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
        " ) > {output.report:q} 2> {log:q}; cat {output.report:q}"

# Settings and functions of the evaluation (evaluate.smk), shared with the
# fine-tuning rule (finetune.smk), which evaluates its model itself when
# evaluate.after_training is true.

import shlex

#: evaluate.after_training: true -> the fine-tuning job evaluates its model at
#: the end and writes the evaluation outputs below (one interpreter start and
#: one model build less per run: the demo's setting; a change of the evaluation
#: code then reruns the training too); false (default) -> one evaluate job per
#: run, so an evaluation change reruns only the evaluation (the studies)
EVAL_AFTER_TRAINING = bool(config["evaluate"].get("after_training", False))

#: what the evaluation of a run writes (rule evaluate, or rule finetune)
EVAL_OUTPUTS = {
    "eval_metrics": f"{RESULTS}/eval/{RUN_DIR}/metrics.json",
    "patterns": f"{RESULTS}/eval/{RUN_DIR}/patterns.npz",
    "features": f"{RESULTS}/eval/{RUN_DIR}/cls_features.npz",
}


def evaluate_options(wildcards):
    """Keyword arguments of tokenreduction.evaluate.evaluate for a run (its
    outputs aside), the same for both routes."""
    dataset = config["datasets"][wildcards.dataset]
    return {
        "dataset": dataset["kind"],
        "data_root": str(dataset_root(wildcards.dataset)),
        "img_size": int(dataset["img_size"]),
        "batch_size": int(config["evaluate"].get("batch_size", 128)),
        "num_pattern_images": int(config["evaluate"].get("num_pattern_images", 256)),
        "throughput_batch": int(config["evaluate"].get("throughput_batch") or 0),
    }


def then_evaluate_arg(wildcards, output, resources):
    """train.py's --then-evaluate argument: empty unless evaluate.after_training."""
    if not EVAL_AFTER_TRAINING:
        return ""
    options = {
        **evaluate_options(wildcards),
        "out_metrics": output.eval_metrics,
        "out_patterns": output.patterns,
        "out_features": output.features,
        "device": job_device(wildcards, resources),
    }
    return f"--then-evaluate {shlex.quote(json.dumps(options, sort_keys=True))}"


def finetune_job_code(wildcards):
    """Code fingerprint of a fine-tuning job: with the evaluation's code when
    the job evaluates too."""
    return (evaluate_code if EVAL_AFTER_TRAINING else finetune_code)(wildcards)


def finetune_job_runtime(wildcards, attempt):
    return train_runtime(wildcards, attempt, uniform=arrayed("finetune")) + (
        30 * attempt if EVAL_AFTER_TRAINING else 0
    )

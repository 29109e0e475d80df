"""Every config mistake stops the DAG build, with the key named and no traceback.

Most rows call the validation the workflow runs (tokenreduction.config_validation,
fast); a few go through ``snakemake -n`` end to end.
"""
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def _load_validation():
    """As the workflow loads it: by path, without torch or timm."""
    name = "tokenreduction_config_validation"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "src" / "tokenreduction" / "config_validation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cv = _load_validation()


def _set(config, path, value):
    """Set config[path] (dotted, [i] indexes lists; or a tuple of keys)."""
    parts = list(path) if isinstance(path, tuple) else []
    for part in [] if isinstance(path, tuple) else path.split("."):
        while "[" in part:
            head, rest = part.split("[", 1)
            if head:
                parts.append(head)
            index, part = rest.split("]", 1)
            parts.append(int(index))
        if part:
            parts.append(part)
    node = config
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value

#: (id, {dotted path: new value}, key path the message must name)
BROKEN = [
    # the kinds of issue 16 that used to pass the dry run
    ("evit-misspelled-option", {"methods.evit.fuse_tokn": True}, "methods.evit.fuse_tokn"),
    ("kmedoids-misspelled-option", {"methods.kmedoids.cluster_iter": 3}, "methods.kmedoids.cluster_iter"),
    ("locations-not-increasing", {"reduction_loc": [6, 3, 9]}, "reduction_loc"),
    ("timm-model-missing", {"backbones.tiny.model": "vit_tinyy_patch16_224"}, "backbones.tiny.model"),
    ("recipe-misspelled-key", {"finetune.epoch": 3}, "finetune.epoch"),
    ("recipe-negative-epochs", {"finetune.epochs": -3}, "finetune.epochs"),
    ("recipe-lr-as-text", {"finetune.lr": "1e-3"}, "finetune.lr"),
    ("recipe-batch-size-zero", {"finetune.batch_size": 0}, "finetune.batch_size"),
    ("atc-linkage-ward", {"methods.atc-average.linkage": "ward"}, "methods.atc-average.linkage"),
    ("ots-r-too-large", {"ots.r": [0, 2, 40]}, "ots.r"),
    # kinds caught before (schema and workflow checks)
    ("unknown-method", {"methods.topk.method": "topkk"}, "methods.topk.method"),
    ("keep-rate-above-one", {"experiments[0].keep_rates": [0.5, 1.5]}, "experiments[0].keep_rates[1]"),
    ("keep-rate-zero", {"experiments[0].keep_rates": [0.0]}, "experiments[0].keep_rates[0]"),
    ("location-beyond-depth", {"reduction_loc": [3, 6, 12]}, "reduction_loc"),
    ("dataset-root-missing", {"datasets.digits.kind": "imagefolder", "datasets.digits.root": "/nonexistent/digits"},
     "datasets.digits.root"),
    ("dataset-kind-unknown", {"datasets.digits.kind": "imagenett"}, "datasets.digits.kind"),
    ("experiment-undefined-method", {"experiments[0].methods": ["topk", "nosuch"]}, "experiments[0].methods"),
    ("experiment-undefined-backbone", {"experiments[1].backbones": ["huge"]}, "experiments[1].backbones"),
    ("unknown-top-level-key", {"finetunes": {"epochs": 1}}, "finetunes"),
    ("budget-unknown", {"budget": "exponential"}, "budget"),
    ("init-checkpoint-missing", {"backbones.small.init": "/nonexistent/deit.pth"}, "backbones.small.init"),
    # method options: values, types, builder-set options
    ("heuristic-pattern-unknown", {"methods.heuristic.pattern": "l3"}, "methods.heuristic.pattern"),
    ("dpcknn-k-zero", {"methods.dpcknn.k_neighbors": 0}, "methods.dpcknn.k_neighbors"),
    ("sinkhorn-eps-negative", {"methods.sinkhorn.sinkhorn_eps": -1.0}, "methods.sinkhorn.sinkhorn_eps"),
    ("kmedoids-iters-negative", {"methods.kmedoids.cluster_iters": -1}, "methods.kmedoids.cluster_iters"),
    ("option-wrong-type", {"methods.evit.fuse_token": "yes"}, "methods.evit.fuse_token"),
    ("option-int-given-float", {"methods.dpcknn.k_neighbors": 2.5}, "methods.dpcknn.k_neighbors"),
    ("option-set-by-builder", {"methods.sit.num_out": 5}, "methods.sit.num_out"),
    ("locations-repeated", {"reduction_loc": [3, 3, 9]}, "reduction_loc"),
    ("variant-budget-unknown", {"methods.evit-cur.budget": "r"}, "methods.evit-cur.budget"),
    ("clca-option-unknown", {"methods.evit-cur-clca.clca.num_clrs": 1}, "methods.evit-cur-clca.clca.num_clrs"),
    ("clca-option-wrong-type", {"methods.tome-cur-clca.clca.clc": "on"}, "methods.tome-cur-clca.clca.clc"),
    ("clca-option-out-of-range", {"methods.tome-cur-clca.clca.num_clr": -1}, "methods.tome-cur-clca.clca"),
    # timm models
    ("timm-tag-missing", {"backbones.tiny.model": "vit_tiny_patch16_224.nosuchtag"}, "backbones.tiny.model"),
    ("timm-not-a-vit", {"backbones.tiny.model": "resnet50"}, "backbones.tiny.model"),
    ("model-depth-zero", {"backbones.tiny.model_kwargs.depth": 0}, "backbones.tiny.model_kwargs.depth"),
    ("no-class-token-for-cls-method", {"backbones.small.model_kwargs.class_token": False,
                                       "backbones.small.model_kwargs.global_pool": "avg"}, "experiments[1].keep_rates"),
    # recipes
    ("recipe-warmup-negative", {"finetune.warmup_epochs": -1}, "finetune.warmup_epochs"),
    ("recipe-cooldown-negative", {"finetune.cooldown_epochs": -1}, "finetune.cooldown_epochs"),
    ("recipe-text-for-float", {"finetune.mixup": "lots"}, "finetune.mixup"),
    ("recipe-workflow-field", {"finetune.model": "deit_small_patch16_224"}, "finetune.model"),
    ("recipe-bad-choice", {"finetune.multilabel_loss": "focal"}, "finetune.multilabel_loss"),
    ("recipe-optimizer-unknown", {"finetune.opt": "adamww"}, "finetune.opt"),
    ("recipe-schedule-unknown", {"finetune.sched": "cosinee"}, "finetune.sched"),
    ("recipe-tuning-unknown", {"finetune.tuning": "lora"}, "finetune.tuning"),
    ("recipe-bool-as-text", {"finetune.amp": "yes"}, "finetune.amp"),
    ("recipe-ema-decay-range", {"finetune.model_ema_decay": 2.0}, "finetune.model_ema_decay"),
    ("sit-hidden-ratio-zero", {"methods.sit.hidden_ratio": 0.0}, "methods.sit"),
    ("sinkhorn-iters-zero", {"methods.sinkhorn.cluster_iters": 0}, "methods.sinkhorn.cluster_iters"),
    ("pretrain-recipe-key", {"pretrain.recipe.epoch": 3}, "pretrain.recipe.epoch"),
    ("dataset-recipe-key", {"datasets.leaves.recipe.trainval": True}, "datasets.leaves.recipe.trainval"),
    ("dataset-recipe-range", {"datasets.leaves.recipe.drop_path": -0.1}, "datasets.leaves.recipe.drop_path"),
    ("mae-recipe-layer-decay", {"mae.recipe.layer_decay": 1.5}, "mae.recipe.layer_decay"),
    ("mae-r-too-large", {"mae.r": [40]}, "mae.r"),
    ("mae-undefined-backbone", {"mae.backbones": ["huge"]}, "mae.backbones"),
    # off the shelf, benchmark, detection, diffusion sections
    ("ots-multilabel-dataset", {"ots.dataset": "mosaic"}, "ots.dataset"),
    ("ots-undefined-method", {"ots.methods": ["tome", "nosuch"]}, "ots.methods"),
    ("ots-schedule-unknown", {"ots.schedules": ["linear"]}, "ots.schedules[0]"),
    ("ots-preset-unknown", {"ots.backbones.tiny": {"preset": "augreg_gigantic"}}, "ots.backbones.tiny.preset"),
    ("benchmark-r-too-large", {"benchmark.r_models": [{"method": "tome", "r": 40}]}, "benchmark.r_models[0].r"),
    ("benchmark-schedule-unknown", {"benchmark.r_models": [{"method": "tome", "r": 2, "schedule": "steady"}]},
     "benchmark.r_models[0].schedule"),
    ("benchmark-undefined-backbone", {"benchmark.backbones": ["huge"]}, "benchmark.backbones"),
    ("detection-config-missing", {"detection.sizes.tiny.config": "configs/detection/nosuch.py"},
     "detection.sizes.tiny.config"),
    ("detection-checkpoint-missing", {"detection.sizes.tiny.load_from": "pretrained/nosuch.pth"},
     "detection.sizes.tiny.load_from"),
    ("detection-undefined-method", {"detection.methods": ["atc-average", "nosuch"]}, "detection.methods"),
    ("detection-method-not-merging", {"detection.methods": ["topk"]}, "detection.methods"),
    ("detection-method-with-budget", {"detection.methods": ["tome-cur"]}, "detection.methods"),
    ("clustering-method-not-atc", {"benchmark.clustering.methods": ["atc-single", "tome"]},
     "benchmark.clustering.methods"),
    ("diffusion-keep-rate-out-of-range", {("diffusion", "experiments", "tome-0.5", "keep_rate"): 1.5},
     "diffusion.experiments.tome-0.5.keep_rate"),
    ("diffusion-keep-rate-missing", {("diffusion", "experiments", "tome-0.5"): {"method": "tome"}},
     "diffusion.experiments.tome-0.5.keep_rate"),
    ("diffusion-options-on-none", {("diffusion", "experiments", "none", "keep_rate"): 0.5},
     "diffusion.experiments.none.keep_rate"),
    ("diffusion-linkage-without-atc", {("diffusion", "experiments", "tome-0.5", "linkage"): "single"},
     "diffusion.experiments.tome-0.5.linkage"),
    ("diffusion-undefined-dataset", {"diffusion.dataset": "imagenet"}, "diffusion.dataset"),
    ("diffusion-class-names-file-missing", {"diffusion.class_names": "/nonexistent/names.txt"}, "diffusion.class_names"),
    # once also checked by ots_common / benchmark_common / diffusion_common.smk (issue 27): the validator's alone now
    ("ots-undefined-dataset", {"ots.dataset": "imagenet"}, "ots.dataset"),
    ("ots-pretrain-not-by-the-dag", {"ots.backbones.tiny": {"pretrain": "nosuch"}}, "ots.backbones.tiny.pretrain"),
    ("mae-multilabel-dataset", {"mae.dataset": "mosaic"}, "mae.dataset"),
    ("mae-undefined-method", {"mae.methods": ["deit", "nosuch"]}, "mae.methods"),
    ("benchmark-undefined-method", {"benchmark.methods": ["nosuch"]}, "benchmark.methods"),
    ("benchmark-r-model-undefined-method", {"benchmark.r_models": [{"method": "nosuch", "r": 2}]},
     "benchmark.r_models[0].method"),
]


def _broken(changes):
    config = copy.deepcopy(DEMO)
    for path, value in changes.items():
        _set(config, path, value)
    return config


def test_the_demo_and_the_studies_are_valid(tmp_path):
    assert cv.check_config(copy.deepcopy(DEMO), SCHEMA, repo=REPO) == []
    for name in ("which-tokens.yaml", "clca.yaml", "atc.yaml"):
        config = yaml.safe_load((REPO / "config" / name).read_text())
        for key, spec in config["datasets"].items():
            spec["root"] = str(tmp_path)
        problems = cv.check_config(config, SCHEMA, repo=REPO)
        # the ATC study names checkpoint files and roots a user downloads first
        assert all("does not exist" in message for _, message in problems), (name, problems)
        if name != "atc.yaml":
            assert problems == [], (name, problems)


@pytest.mark.parametrize("changes,key", [row[1:] for row in BROKEN], ids=[row[0] for row in BROKEN])
def test_broken_config_is_caught_with_its_key(changes, key):
    problems = cv.check_config(_broken(changes), SCHEMA, repo=REPO)
    assert problems, "not caught"
    keys = [k for k, _ in problems]
    assert key in keys, problems
    text = cv.format_problems(problems)
    assert "Traceback" not in text and key in text


def test_broken_config_kinds_count():
    """The table covers at least 30 kinds of mistakes (issue 16 asks for them)."""
    assert len({row[0] for row in BROKEN}) == len(BROKEN) >= 30


def test_messages_say_what_is_wrong():
    def message(changes, key):
        return dict(cv.check_config(_broken(changes), SCHEMA, repo=REPO))[key]

    assert "fuse_token" in message({"methods.evit.fuse_tokn": True}, "methods.evit.fuse_tokn")  # did you mean
    assert "single, complete, average" in message({"methods.atc-average.linkage": "ward"}, "methods.atc-average.linkage")
    assert "1.0e-3" in message({"finetune.lr": "1e-3"}, "finetune.lr")
    assert "increasing" in message({"reduction_loc": [6, 3, 9]}, "reduction_loc")
    too_large = message({"ots.r": [0, 2, 40]}, "ots.r")
    assert "r=40" in too_large and "block" in too_large
    assert "0..11" in message({"reduction_loc": [3, 6, 12]}, "reduction_loc")


def test_r_at_the_limit_passes_and_one_more_fails():
    """The budget simulation agrees with the library: the demo backbone has 64
    patches and 12 blocks, so constant r = 5 leaves tokens at every block,
    while r = 6 asks block 10 for more tokens than are left (ToMe's halving
    included: 64 - 9 x 6 - 5 = 5 left)."""
    ok = _broken({"ots.r": [5], "ots.schedules": ["constant"]})
    assert cv.check_config(ok, SCHEMA, repo=REPO) == []
    for method, left in (("tome", 5), ("topk", 4)):
        bad = _broken({"ots.r": [6], "ots.schedules": ["constant"], "ots.methods": [method]})
        problems = cv.check_config(bad, SCHEMA, repo=REPO)
        assert [k for k, _ in problems] == ["ots.r"], problems
        assert "block 10" in problems[0][1] and f"only {left} patch tokens" in problems[0][1]
    from tokenreduction import create_model

    for method in ("tome", "topk"):  # the library agrees
        kwargs = DEMO["backbones"]["tiny"]["model_kwargs"]
        create_model("vit_tiny_patch16_224", method=method, r=5, **kwargs)
        with pytest.raises(ValueError, match="block 10"):
            create_model("vit_tiny_patch16_224", method=method, r=6, **kwargs)


def _init_parameters(cls) -> dict:
    """Keyword parameters of cls's constructor, following **kwargs up the MRO
    (name -> inspect.Parameter), without self and dim."""
    import inspect

    params = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__)
        for p, v in sig.parameters.items():
            if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY) and p not in params:
                params[p] = v
        if not any(v.kind is v.VAR_KEYWORD for v in sig.parameters.values()):
            break
    params.pop("self", None)
    params.pop("dim", None)
    return params


def test_method_options_match_the_reducer_classes():
    """Every registered reducer's constructor signature is its declaration:
    the same option names and defaults, required where the declaration says,
    the same class flags, and the class checks with that very declaration."""
    import inspect

    from tokenreduction.reduction import get_method, list_methods
    from tokenreduction.reduction.options import METHODS

    catalog = cv.method_catalog()
    assert sorted(catalog) == sorted(METHODS) == list_methods()
    for name in list_methods():
        cls = get_method(name)
        declared = catalog[name]
        assert cls.option_spec is METHODS[name], name
        params = _init_parameters(cls)
        assert set(declared.options) == set(params), name
        for opt, param in params.items():
            option = declared.options[opt]
            if param.default is inspect.Parameter.empty:
                assert option.required, (name, opt)
            else:
                assert option.default == param.default, (name, opt)
        assert declared.needs_class_token == cls.needs_class_token, name
        assert declared.fixed_output == cls.fixed_output, name
        assert declared.needs_grid == getattr(cls, "needs_grid", False), name
        builder = set()
        if cls.fixed_output:
            builder |= {"num_out", "num_in"}
        if getattr(cls, "needs_grid", False):
            builder.add("grid_size")
        assert set(declared.builder_options) == builder, name


def test_choice_lists_are_the_libraries():
    """The declared choices are the tuples the method code uses."""
    from tokenreduction.reduction import ats, clustering, heuristic, kmedoids
    from tokenreduction.reduction.options import METHODS

    assert METHODS["atc"].options["linkage"].choices == clustering.LINKAGES
    assert METHODS["ats"].options["quantile_rule"].choices == ats.QUANTILE_RULES
    assert METHODS["heuristic"].options["pattern"].choices == heuristic.PATTERNS
    assert METHODS["kmedoids"].options["init"].choices == kmedoids.INITS


BAD_VALUES = [
    ("atc", {"linkage": "ward"}, "linkage"),
    ("atc", {"linkage": 3}, "linkage"),
    ("ats", {"quantile_rule": "median"}, "quantile_rule"),
    ("heuristic", {"pattern": "l3"}, "pattern"),
    ("heuristic", {"rule": "round"}, "rule"),
    ("dpcknn", {"k_neighbors": 0}, "k_neighbors"),
    ("dpcknn", {"k_neighbors": 2.5}, "k_neighbors"),
    ("kmedoids", {"cluster_iters": -1}, "cluster_iters"),
    ("kmedoids", {"init_index": -2}, "init_index"),
    ("kmedoids", {"medoid_update": "pam"}, "medoid_update"),
    ("evit", {"fuse_token": "yes"}, "fuse_token"),
    ("sinkhorn", {"sinkhorn_eps": 0.0}, "sinkhorn_eps"),
    ("sinkhorn", {"cluster_iters": 0}, "cluster_iters"),
    ("patchmerger", {"scaled_attention": 1}, "scaled_attention"),
]


@pytest.mark.parametrize("name,options,key", BAD_VALUES, ids=[f"{n}-{k}-{list(o.values())[0]}" for n, o, k in BAD_VALUES])
def test_a_bad_value_is_refused_by_the_constructor_and_the_validator_alike(name, options, key):
    """One message from both: the DAG-build check (the validator's copy of the
    declarations, loaded by path) and the real constructor."""
    from tokenreduction.reduction import get_method

    problems = cv.method_catalog()[name].problems(options, dim=16)
    assert [k for k, _ in problems] == [key]
    builder = {"num_out": 4} if get_method(name).fixed_output else {}
    with pytest.raises(ValueError) as refused:
        get_method(name)(dim=16, **options, **builder)
    assert str(refused.value) == problems[0][1]
    assert cv.method_catalog()[name].problems({}, dim=16) == []  # the defaults pass


def test_width_dependent_checks_agree():
    """sit's hidden units and DynamicViT's predictor width: refused at DAG build
    for the model's embed_dim with the constructor's message."""
    from tokenreduction.reduction import get_method

    for name, options, dim in (("sit", {"hidden_ratio": 0.1}, 8), ("dynamicvit", {}, 3)):
        (problem,) = cv.method_catalog()[name].problems(options, dim=dim)
        builder = {"num_out": 4} if get_method(name).fixed_output else {}
        with pytest.raises(ValueError) as refused:
            get_method(name)(dim=dim, **options, **builder)
        assert str(refused.value) == problem[1]
        assert cv.method_catalog()[name].problems(options, dim=64) == []


def test_declared_output_counts_are_the_reducers():
    """The count the DAG-build simulation uses equals the built reducer's
    output_count (every method but the heuristic, whose shells need the grid)."""
    from tokenreduction.models.budget import StageBudget
    from tokenreduction.reduction import get_method, list_methods

    variants = {"evit": [{"fuse_token": True}, {"fuse_token": False}],
                "ats": [{"quantile_rule": "reference"}, {"quantile_rule": "midpoint"}]}
    checked = 0
    for name in list_methods():
        if name == "heuristic":
            continue
        cls = get_method(name)
        for options in variants.get(name, [{}]):
            for n in (1, 2, 7, 49, 196, 197):
                for target in sorted({1, 2, n // 3 + 1, n - 1, n, n + 3} - {0}):
                    sb = StageBudget(target=min(target, n), r=max(0, n - target))
                    built = {"num_out": min(target, n), "num_in": n} if cls.fixed_output else {}
                    reducer = cls(dim=16, **options, **built)
                    assert cv.method_catalog()[name].output_count(options, n, sb) == reducer.output_count(n, sb), (
                        name, options, n, target)
                    checked += 1
    assert checked > 300


def test_ats_grid_length_is_torchs():
    from tokenreduction.reduction.ats import ats_sample_steps

    ats = cv.options_module()
    assert [ats.ats_step_count(k) for k in range(1, 400)] == [ats_sample_steps(k).numel() for k in range(1, 400)]


@pytest.mark.parametrize("relative,table", [("reduction/options.py", "METHODS"),
                                            ("clca/config.py", "CLCAConfig.__dataclass_fields__"),
                                            ("config_validation.py", "check_config.__doc__")])
def test_declarations_load_without_torch(relative, table):
    """The validator, and what it reads by path, load with no package import,
    no torch and no timm (as the workflow loads them at DAG build)."""
    code = ("import sys, importlib.util; spec = importlib.util.spec_from_file_location('o', sys.argv[1]);"
            " m = importlib.util.module_from_spec(spec); sys.modules['o'] = m; spec.loader.exec_module(m);"
            " assert not {'torch', 'timm', 'tokenreduction'} & set(sys.modules), sorted(sys.modules);"
            f" print(len(m.{table}))")
    path = Path(cv.__file__).parent / relative
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0


def test_every_recipe_and_clca_field_type_is_understood():
    """Each TrainConfig / CLCAConfig field type is one the check understands
    (no field goes unchecked) and accepts the field's own default; the library
    exports the CLCAConfig the validator loads."""
    import dataclasses

    from tokenreduction.clca import CLCAConfig

    assert CLCAConfig.__module__ == "tokenreduction.clca.config"
    assert list(cv.field_types(cv.clca_config_class())) == [f.name for f in dataclasses.fields(CLCAConfig)]
    checked = 0
    for cls in (cv.train_config_module().TrainConfig, cv.clca_config_class()):
        flat = {**cv.train_config_module().ModelSpec.__dataclass_fields__, **cls.__dataclass_fields__}
        for name, hint in cv.field_types(cls).items():
            f = flat[name]  # TrainConfig's model spec keys are ModelSpec's fields
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                continue
            assert cv.type_problem(default, hint) is None, (cls.__name__, name, hint, default)
            assert cv._fits(object(), hint) is not None, (cls.__name__, name, hint)  # understood, not skipped
            checked += 1
    assert checked > 50
    assert cv.type_problem([1, "x"], cv.field_types(cv.clca_config_class())["reduction_loc"])


@pytest.mark.parametrize("name,kwargs", [
    ("deit_tiny_patch16_224", {}),
    ("vit_huge_patch14_224", {}),
    ("vit_large_patch16_384", {}),
    ("vit_base_patch16_224.mae", {}),
    ("vit_base_patch16_clip_224.laion2b", {"img_size": 448}),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 6}),
])
def test_depth_and_patches_are_timms(name, kwargs):
    """Read from timm's sources = what timm builds (on the meta device)."""
    import timm
    import torch

    info = cv.timm_model_info(name, kwargs)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    assert info.depth == len(model.blocks)
    assert info.num_patches == model.patch_embed.num_patches


def test_timm_index_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cv.timm_architectures.cache_clear()
    try:
        first = cv.timm_architectures()
        files = list((tmp_path / "tokenreduction").glob("timm-*.json"))
        assert len(files) == 1 and "deit_small_patch16_224" in first
        cv.timm_architectures.cache_clear()
        assert cv.timm_architectures() == json.loads(files[0].read_text())
    finally:
        cv.timm_architectures.cache_clear()


def _dry_run(tmp_path, changes):
    config = _broken(changes)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path / "work"),
         "-n", "--configfile", str(path)],
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("changes,key", [
    ({"methods.evit.fuse_tokn": True}, "methods.evit.fuse_tokn"),
    ({"reduction_loc": [6, 3, 9]}, "reduction_loc"),
    ({"finetune.epoch": 3, "finetune.lr": "1e-3"}, "finetune.epoch"),
], ids=["option", "locations", "recipe"])
def test_snakemake_dry_run_stops_with_the_key_and_no_traceback(tmp_path, changes, key):
    proc = _dry_run(tmp_path, changes)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert key in out and "invalid config" in out
    assert "Traceback" not in out and 'File "' not in out, out


def test_dry_run_refuses_what_the_common_smk_files_used_to_check(tmp_path):
    """The checks removed from ots_common, benchmark_common and diffusion_common
    (issue 27) still stop the DAG build, each key named, by the validator."""
    changes = {"ots.backbones.tiny": {"pretrain": "nosuch"}, "mae.methods": ["deit", "nosuch"],
               "benchmark.methods": ["nosuch"], "diffusion.dataset": "imagenet"}
    proc = _dry_run(tmp_path, changes)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "invalid config (4 problems)" in out, out
    for key in ("ots.backbones.tiny.pretrain", "mae.methods", "benchmark.methods", "diffusion.dataset"):
        assert f"at {key}:" in out, (key, out)
    assert "Traceback" not in out and 'File "' not in out, out


def test_schema_lists_agree_with_the_library():
    """Where the schema repeats a library list (for its own error messages),
    the lists are the same."""
    from tokenreduction.data import DATASET_KINDS, MULTILABEL_KINDS

    kinds, multilabel = cv.dataset_kinds()
    assert kinds == tuple(DATASET_KINDS) and set(multilabel) == set(MULTILABEL_KINDS)
    dataset_entry = SCHEMA["properties"]["datasets"]["additionalProperties"]
    assert set(dataset_entry["properties"]["kind"]["enum"]) == set(DATASET_KINDS)
    from tokenreduction.ots import PRESETS

    assert set(cv.ots_presets()) == set(PRESETS)
    for name, preset in PRESETS.items():
        read = cv.ots_presets()[name]
        assert (read["depth"], read["patch_size"], read["img_size"]) == (preset.depth, preset.patch_size, preset.img_size)


@pytest.mark.parametrize("section", ["methods", "detection", "diffusion"])
def test_a_bug_in_a_check_stops_the_build_with_its_traceback(monkeypatch, section):
    """A validator that raises must not be skipped (it would switch its check off):
    check_config raises ValidatorError naming the section, chained to the bug."""

    def buggy(self):
        return {}["no such key"]  # the injected bug: a KeyError inside the check

    monkeypatch.setattr(cv._Checker, section, buggy)
    with pytest.raises(cv.ValidatorError, match=f"config check '{section}'") as caught:
        cv.check_config(copy.deepcopy(DEMO), SCHEMA, repo=REPO)
    assert isinstance(caught.value.__cause__, KeyError)
    assert caught.value.__cause__.__traceback__ is not None

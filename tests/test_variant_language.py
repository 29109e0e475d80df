"""One config language for method variants (issue 27, item 2).

Every study section names a variant as a methods: registry name (or, for a
diffusion experiment, inline as {method, linkage, keep_rate}), swept over
keep_rate (fraction kept) or r (tokens removed per block). Checked here:
the converted study configs plan exactly the jobs they planned before
(tests/fixtures/dag_jobs/, recorded before the conversion by its record.py),
each old spelling is refused with one message naming its new key, and the
keep_rate <-> tomesd ratio conversion."""
from __future__ import annotations

import copy
import importlib.util
import json
import re

import pytest
import yaml

from workflow_utils import REPO, load_config, planned_commands, snakemake, write_config

from tokenreduction.diffusion.variant import keep_rate_of, patch_options, tomesd_ratio


from test_config_validation import cv  # the validation module, loaded by path as the workflow does)

SCHEMA = cv.load_schema(REPO / "workflow" / "schemas" / "config.schema.yaml")
DEMO = load_config("config.yaml")


def _recorder():
    spec = importlib.util.spec_from_file_location("dag_jobs_record", REPO / "tests" / "fixtures" / "dag_jobs" / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ DAGs unchanged
@pytest.mark.slow
@pytest.mark.parametrize("name", ["config.yaml", "which-tokens.yaml", "clca.yaml", "atc.yaml"])
def test_converted_config_plans_the_recorded_jobs(tmp_path, name):
    record = _recorder()
    planned = record.planned_job_lines(name, tmp_path)
    recorded = record.recorded(name)
    assert len(recorded) > 100
    assert planned == recorded, (sorted(set(recorded) - set(planned))[:10], sorted(set(planned) - set(recorded))[:10])


def test_job_lines_sort_wildcards_and_keep_jobs_without_any():
    out = ("rule b:\n    input: x\n    wildcards: z=1, a=2\n    resources: tmpdir=/tmp\n\n"
           "localrule all:\n    input: y\n\nrule b:\n    wildcards: a=0, z=3\n")
    assert _recorder().job_lines(out) == ["all\t", "b\ta=0, z=3", "b\ta=2, z=1"]


@pytest.mark.slow
def test_demo_jobs_get_their_variants_options(tmp_path):
    """The registry names and keep rates reach the jobs: the clustering
    benchmark's linkages, the detection backbone's linkage and keep rate,
    diffusion's apply_patch options (tomesd's ratio, as the old spelling gave)."""
    from workflow_utils import with_existing_inputs

    path = write_config(tmp_path / "demo.yaml", with_existing_inputs(load_config("config.yaml"), tmp_path))
    commands = planned_commands(snakemake(["-n", "-p", "--configfile", str(path)], tmp_path).stdout)
    by_rule: dict = {}
    for rule, command in commands:
        by_rule.setdefault(rule, []).append(command)
    assert "--linkages single complete average " in by_rule["benchmark_clustering"][0]
    train = sorted(re.search(r"--linkage (\S+) --keep-rate (\S+)", c).groups() for c in by_rule["detection_train"])
    assert train == [("average", "0.5"), ("tome", "1")]  # atc-average at keep_rate 0.5; the baseline unreduced
    merges = sorted(json.dumps(json.loads(re.search(r"--merge '([^']*)'", c).group(1)), sort_keys=True)
                    for c in by_rule["sd_generate"])
    assert merges == sorted(json.dumps(m, sort_keys=True) for m in (
        {"merge_fn": "none"}, {"merge_fn": "tome", "ratio": 0.5},
        {"merge_fn": "atc", "linkage": "average", "ratio": 0.5}))


# ------------------------------------------------------------------ old spellings refused
def _demo_with(edit):
    config = copy.deepcopy(DEMO)
    edit(config)
    return config


OLD_SPELLINGS = [
    ("detection-ratios", lambda c: c["detection"].update(ratios=c["detection"].pop("keep_rates")),
     "detection.ratios", "detection.keep_rates"),
    ("detection-methods-mapping", lambda c: c["detection"].update(methods={"atc-average": "average"}),
     "detection.methods", "methods: registry"),
    ("diffusion-merge-fn", lambda c: c["diffusion"]["experiments"].update(
        {"tome-0.5": {"merge_fn": "tome", "keep_rate": 0.5}}),
     "diffusion.experiments.tome-0.5.merge_fn", "diffusion.experiments.tome-0.5.method"),
    ("diffusion-ratio", lambda c: c["diffusion"]["experiments"].update(
        {"tome-0.5": {"method": "tome", "ratio": 0.1}}),
     "diffusion.experiments.tome-0.5.ratio", "diffusion.experiments.tome-0.5.keep_rate"),
    ("clustering-linkages", lambda c: c["benchmark"]["clustering"].update(
        linkages=["single"]), "benchmark.clustering.linkages", "benchmark.clustering.methods"),
]


@pytest.mark.parametrize("edit,key,new_key", [row[1:] for row in OLD_SPELLINGS], ids=[row[0] for row in OLD_SPELLINGS])
def test_old_spelling_is_refused_naming_the_new_key(edit, key, new_key):
    problems = cv.check_config(_demo_with(edit), SCHEMA, repo=REPO)
    assert len(problems) == 1, problems  # one message, not a schema complaint besides
    assert problems[0][0] == key
    assert new_key in problems[0][1]


def test_old_diffusion_ratio_message_gives_the_keep_rate():
    edit = OLD_SPELLINGS[3][1]
    (_, message), = cv.check_config(_demo_with(edit), SCHEMA, repo=REPO)
    assert "keep_rate: 0.9" in message and "1 - ratio" in message


@pytest.mark.slow
def test_old_spelling_stops_the_dag_build(tmp_path):
    config = _demo_with(OLD_SPELLINGS[0][1])
    path = write_config(tmp_path / "old.yaml", config)
    proc = snakemake(["-n", "--configfile", str(path)], tmp_path, check=False)
    assert proc.returncode != 0
    assert "detection.ratios was renamed: use detection.keep_rates" in proc.stderr + proc.stdout


def test_every_config_uses_the_new_spelling():
    for path in sorted((REPO / "config").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert cv.renamed_problems(config) == [], path.name


# ------------------------------------------------------------------ keep_rate <-> tomesd ratio
@pytest.mark.parametrize("keep_rate,ratio", [(0.9, 0.1), (0.8, 0.2), (0.7, 0.3), (0.6, 0.4), (0.5, 0.5), (1.0, 0.0)])
def test_keep_rate_and_tomesd_ratio_convert_exactly_as_printed(keep_rate, ratio):
    assert tomesd_ratio(keep_rate) == ratio  # 1 - 0.9 in floats is 0.09999999999999998
    assert keep_rate_of(ratio) == keep_rate
    assert repr(tomesd_ratio(keep_rate)) == repr(ratio)
    assert abs(tomesd_ratio(keep_rate) + keep_rate - 1) < 1e-12


@pytest.mark.parametrize("call,value", [(tomesd_ratio, 0.0), (tomesd_ratio, 1.5), (tomesd_ratio, "0.5"),
                                        (keep_rate_of, 1.0), (keep_rate_of, -0.1), (keep_rate_of, True)])
def test_conversion_refuses_values_out_of_range(call, value):
    with pytest.raises(ValueError):
        call(value)


def test_atc_study_experiments_remove_the_fraction_their_names_say():
    """The study names its runs by the fraction removed (tome-r0.1): the
    converted keep_rate gives apply_patch exactly that ratio."""
    experiments = load_config("atc.yaml")["diffusion"]["experiments"]
    assert len(experiments) == 21
    for name, spec in experiments.items():
        options = patch_options(spec)
        if name == "none":
            assert options == {"merge_fn": "none"}
            continue
        method, _, removed = name.rpartition("-r")
        assert options["ratio"] == float(removed), name
        assert options["merge_fn"] == method.split("-")[0]
        assert options.get("linkage") == (method.split("-")[1] if options["merge_fn"] == "atc" else None)
        assert "runtime" not in options and "keep_rate" not in options and "method" not in options


@pytest.mark.parametrize("spec,problem", [
    ({"method": "kmeans", "keep_rate": 0.5}, "method"),
    ({"method": "tome"}, "keep_rate"),
    ({"method": "tome", "keep_rate": 0.5, "linkage": "single"}, "linkage"),
    ({"method": "none", "keep_rate": 0.5}, "keep_rate"),
    ({"method": "atc", "keep_rate": 0.5, "ratio": 0.5}, "ratio"),
])
def test_patch_options_names_the_bad_key(spec, problem):
    with pytest.raises(ValueError, match=rf"^{problem}: "):
        patch_options(spec)

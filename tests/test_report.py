"""The report: section tables and the Markdown index from fabricated CSVs, the
index's inputs following the stages the config enables, and the HTML report
built by `snakemake --report` from a reduced demo run, rendered in headless
Chromium with its sections checked in the DOM.

The Chromium test skips, with the reason, only where no chromium is installed
and CI is unset (in CI a missing browser is a failure: `.ci/run` installs it
with `apt-get install -y chromium`).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pandas as pd
import pytest

from test_workflow import tiny_demo_config
from workflow_utils import load_config, snakemake, write_config
from tokenreduction import report

OTHER_STAGES = ("ots", "mae", "detection", "diffusion")


def _metrics() -> pd.DataFrame:
    rows = []
    for method, rate, acc, seed in [("deit", 1.0, 90.0, 0), ("deit", 1.0, 92.0, 1), ("topk", 0.5, 80.0, 0),
                                    ("topk", 0.5, 82.0, 1), ("topk", 0.7, 85.0, 0), ("topk", 0.7, 85.0, 1)]:
        rows.append({"dataset": "digits", "backbone": "tiny", "method": method, "keep_rate": rate, "seed": seed,
                     "metric_name": "acc1", "metric": acc, "gflops": 0.02 * rate})
    return pd.DataFrame(rows)


def test_summary_section_pivots_methods_by_keep_rate():
    section = report.summary_section(_metrics())
    (title, table), = section.tables
    assert title == "digits / tiny: acc1"
    table = table.set_index("method")
    assert table.loc["deit", "kr 1"] == "91.00 ± 1.41"
    assert table.loc["topk", "kr 0.5"] == "81.00 ± 1.41" and table.loc["topk", "kr 0.7"] == "85.00 ± 0.00"
    assert table.loc["deit", "kr 0.5"] == ""
    assert table.loc["topk", "GFLOPs kr 0.5"] == pytest.approx(0.01)


def test_markdown_and_html_tables_and_index():
    frame = pd.DataFrame({"name": ["a|b", "c"], "value": [0.123456, 1234.5], "ok": [True, False]})
    text = report.markdown_table(frame)
    lines = text.splitlines()
    assert lines[0] == "| name | value | ok |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| a\\|b | 0.123 | yes |" and lines[3] == "| c | 1234.5 | NO |"
    page = report.render_html(report.Section("T", "intro", [("first", frame)], ["a note"]))
    assert page.startswith("<!DOCTYPE html>") and "<td>a|b</td>" in page and "a note" in page
    config = load_config("config.yaml")
    index = report.index_markdown(config, [report.summary_section(_metrics())])
    assert index.startswith("# Results")
    assert "## Configuration" in index and "## Accuracy per method and keep rate" in index
    assert "| topk |  | 85.00 ± 0.00 | 81.00 ± 1.41 | " in index  # keep rates 1, 0.7, 0.5


def test_stage_table_names_are_unique_paths(tmp_path):
    paths = [tmp_path / "analysis" / d / "correlations_rates.csv" for d in ("digits", "mosaic")]
    names = [name for name, _ in report.table_names(paths)]
    assert names == ["digits/correlations_rates", "mosaic/correlations_rates"]


def _index_command(config: dict, tmp_path) -> str:
    path = write_config(tmp_path / "c.yaml", config)
    out = snakemake(["report_tables", "-n", "-p", "--configfile", str(path)], tmp_path).stdout
    commands = [line for line in out.splitlines() if "report.py index" in line]
    assert len(commands) == 1, out
    return commands[0]


def test_index_reads_only_the_stages_the_config_enables(tmp_path):
    config = tiny_demo_config(tmp_path)
    for stage in OTHER_STAGES:
        config.pop(stage, None)
    command = _index_command(config, tmp_path)
    assert "--speed" in command and "--clustering" in command and "--stage Analysis" in command
    assert "--stage Detection" not in command and "ots/" not in command
    config["benchmark"]["enabled"] = False
    command = _index_command(config, tmp_path)
    assert "--speed" not in command and "--clustering" not in command


# ------------------------------------------------------------------ the HTML report in Chromium


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def rendered_dom(browser: str, page, tmp_path, timeout: int = 120) -> str:
    """The DOM of `page` after its scripts ran, from headless Chromium."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000",
           "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def with_script(page, tmp_path, name: str, code: str):
    """A copy of the report that runs `code` once loaded (to open a category)."""
    html = page.read_text()
    hook = f"<script>window.addEventListener('load', () => setTimeout(() => {{ {code} }}, 0));</script>"
    copy = tmp_path / name
    copy.write_text(html.replace("</body>", hook + "</body>"))
    return copy


@pytest.mark.slow
def test_report_builds_from_a_reduced_demo_and_renders_its_sections(tmp_path):
    browser = chromium()
    if browser is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI installs it")
    assert browser is not None, "chromium is missing in CI: .ci/run must install it (apt-get install -y chromium)"

    config = tiny_demo_config(tmp_path)
    for stage in OTHER_STAGES:
        config.pop(stage, None)
    config["benchmark"] = {
        "backbones": ["tiny"], "batch_exponents": [0, 1], "warmup": 1, "runs": 3, "throw_out": 0.34, "threads": 1,
        "clustering": {"backends": ["scipy", "atc", "sklearn"], "sizes": [16], "batch_sizes": [2],
                       "methods": ["atc-average"], "warmup": 0, "runs": 2},
    }
    path = write_config(tmp_path / "demo.yaml", config)
    snakemake(["--cores", "2", "--configfile", str(path)], tmp_path, timeout=1500)
    results = tmp_path / "results"

    # the Markdown index has every table
    index = (results / "README.md").read_text()
    for heading in ("## Configuration", "## Accuracy per method and keep rate", "## Speed: measured throughput",
                    "Headline: achieved / FLOPs-implied", "## Clustering back ends", "## Analysis"):
        assert heading in index, heading
    speed = pd.read_csv(results / "speed" / "speed.csv").set_index("model")
    assert set(speed.index) == {"baseline", "topk kr0.5", "evit kr0.5"}
    assert speed.loc["baseline", "throughput_ratio"] == 1.0 and (speed.batch_size == 2).all()
    assert speed.loc["topk kr0.5", "achieved_over_implied"] == pytest.approx(
        speed.loc["topk kr0.5", "throughput_ratio"] / speed.loc["topk kr0.5", "flops_implied_speedup"])
    clustering = pd.read_csv(results / "speed" / "clustering.csv")
    assert clustering.agrees.all() and set(clustering.backend) == {"scipy", "atc", "sklearn"}

    out = tmp_path / "report.html"
    snakemake(["--configfile", str(path), "--report", str(out)], tmp_path, timeout=600)
    assert out.stat().st_size > 10_000

    browser_dom = rendered_dom(browser, out, tmp_path)
    # the global description and the menu's categories
    assert "Token reduction in Vision Transformers" in browser_dom
    for category in ("Summary", "Speed", "Configuration", "Analysis"):
        assert f">{category}<" in browser_dom, category
    # inside the categories: the subcategories and the marked files
    speed_dom = rendered_dom(browser, with_script(out, tmp_path, "speed.html", "app.showCategory('Speed')"), tmp_path)
    for name in ("Model throughput", "Clustering back ends", "speed.html", "clustering.html", "throughput.png"):
        assert name in speed_dom, name
    summary_dom = rendered_dom(browser, with_script(out, tmp_path, "summary.html", "app.showCategory('Summary')"),
                               tmp_path)
    for name in ("summary.html", "accuracy_vs_throughput.png", "accuracy_vs_keep_rate.png"):
        assert name in summary_dom, name

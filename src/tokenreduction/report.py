"""The report's tables: every stage's CSV turned into captioned sections,
rendered as standalone HTML pages (for ``snakemake --report``) and as one
plain Markdown index (results/README.md).

A :class:`Section` holds a title, an introduction and titled tables; the
builders below make the sections of the summary (accuracy or mAP per method
and keep rate), the speed benchmarks (throughput ratios, FLOPs, achieved /
FLOPs-implied speed-up), the clustering back ends, and any other stage's CSV
tables as they are. Nothing here imports torch.
"""
from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .io import atomic_path

PathLike = Union[str, Path]

#: rows of a generic stage table shown in full; longer tables are cut (the CSV has them all)
MAX_ROWS = 60


@dataclass
class Section:
    title: str
    intro: str = ""
    tables: List[Tuple[str, pd.DataFrame]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


# ------------------------------------------------------------------ formatting


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "NO"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if 100 <= abs(value) < 1e6:
            return f"{value:.1f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table of `frame` (index dropped)."""
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        cells = [_cell(v, digits).replace("|", "\\|").replace("\n", " ") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def html_table(frame: pd.DataFrame, digits: int = 3) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v, digits))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.2em}.note{color:#555;font-size:0.9em}
"""


def render_html(section: Section) -> str:
    """A self-contained HTML page of one section."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(section.title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1 id='title'>{html.escape(section.title)}</h1>"]
    if section.intro:
        parts.append(f"<p>{html.escape(section.intro)}</p>")
    for title, table in section.tables:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(html_table(table))
    for note in section.notes:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(sections: Sequence[Section], title: str, preamble: str = "") -> str:
    """One Markdown document: a contents list, then every section."""
    out = [f"# {title}", ""]
    if preamble:
        out += [preamble, ""]
    out += ["Contents:", ""] + [f"- [{s.title}](#{_anchor(s.title)})" for s in sections] + [""]
    for section in sections:
        out += [f"## {section.title}", ""]
        if section.intro:
            out += [section.intro, ""]
        for name, table in section.tables:
            out += [f"### {name}", "", markdown_table(table), ""]
        out += [f"_{note}_\n" for note in section.notes]
    return "\n".join(out).rstrip() + "\n"


def _anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return keep.replace(" ", "-")


def write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ------------------------------------------------------------------ sections


def summary_section(metrics: pd.DataFrame) -> Section:
    """Accuracy (top-1, %) or mAP per method and keep rate: one table per
    dataset and backbone, mean over seeds (± std when several), with the
    GFLOPs per image of each run."""
    section = Section(
        "Accuracy per method and keep rate",
        "Top-1 accuracy (single-label) or mAP (multi-label) of every fine-tuned model, mean over seeds "
        "(± standard deviation with several seeds); keep rate 1 is the unreduced baseline. GFLOPs per image "
        "from the actual forward.",
    )
    for (dataset, backbone), part in metrics.groupby(["dataset", "backbone"], sort=False):
        metric_name = str(part.metric_name.iloc[0])
        grouped = part.groupby(["method", "keep_rate"])
        mean, std, n = grouped.metric.mean(), grouped.metric.std(), grouped.metric.count()
        cells = {}
        for key in mean.index:
            text = f"{mean[key]:.2f}"
            if n[key] > 1 and not math.isnan(std[key]):
                text += f" ± {std[key]:.2f}"
            cells[key] = text
        rates = sorted({k for _, k in mean.index}, reverse=True)
        methods = list(dict.fromkeys(part.sort_values("keep_rate", ascending=False).method))
        gflops = part.groupby(["method", "keep_rate"]).gflops.mean()
        rows = []
        for method in methods:
            row = {"method": method}
            for rate in rates:
                row[f"kr {rate:g}"] = cells.get((method, rate), "")
            for rate in rates:
                if (method, rate) in gflops.index:
                    row[f"GFLOPs kr {rate:g}"] = float(gflops[(method, rate)])
            rows.append(row)
        table = pd.DataFrame(rows)
        section.tables.append((f"{dataset} / {backbone}: {metric_name}", table))
    return section


def speed_section(speed: pd.DataFrame) -> Section:
    """The speed table: per backbone and model at the headline batch size,
    measured images/s and ratio to the baseline, GFLOPs and the speed-up they
    imply, and achieved / implied; then the mean of that headline per method."""
    section = Section(
        "Speed: measured throughput against FLOPs",
        "Images/s of each configured model (random weights, random input) measured side by side with the "
        "unreduced baseline in the same job (interleaved runs, warm-up, first runs thrown out, median; IQR "
        "in brackets). 'ratio' = baseline time / model time per round, median over rounds. 'implied' = "
        "baseline GFLOPs / model GFLOPs. 'achieved/implied' = ratio / implied is the headline: 1.0 is the "
        "limit, lower means the reduction's own cost or memory traffic eats the FLOPs saved.",
    )
    if speed.empty:
        section.notes.append("No throughput was measured.")
        return section
    for backbone, part in speed.groupby("backbone", sort=False):
        device, batch = part.device.iloc[0], int(part.batch_size.iloc[0])
        table = pd.DataFrame({
            "model": part.model,
            "img/s": part.img_per_s.map(lambda v: f"{v:.1f}"),
            "IQR": [f"[{a:.1f}, {b:.1f}]" for a, b in zip(part.img_per_s_q25, part.img_per_s_q75)],
            "ratio": part.throughput_ratio.astype(float),
            "GFLOPs": part.gflops.astype(float),
            "implied": part.flops_implied_speedup.astype(float),
            "achieved/implied": part.achieved_over_implied.astype(float),
            "peak MB": part.peak_mem_mb.astype(float),
            "tokens kept": part.tokens_kept.fillna("").astype(str),
        })
        section.tables.append((f"{backbone} on {device}, batch {batch}", table))
    reduced = speed[speed.method != "none"]
    if len(reduced):
        head = reduced.groupby(["backbone", "method"], sort=False).agg(
            models=("model", "count"),
            ratio=("throughput_ratio", "mean"),
            implied=("flops_implied_speedup", "mean"),
            achieved_over_implied=("achieved_over_implied", "mean"),
        ).reset_index().rename(columns={"achieved_over_implied": "achieved/implied"})
        section.tables.insert(0, ("Headline: achieved / FLOPs-implied speed-up per method (mean over keep rates)",
                                  head))
    return section


def clustering_section(clustering: pd.DataFrame, reference: str = "scipy") -> Section:
    """Clustering back ends: per input size N, batch size B and linkage, each
    back end's median time, time per image, speed-up over SciPy and whether
    its clusters agree with SciPy's; back ends that disagree are listed."""
    section = Section(
        "Clustering back ends",
        f"The clustering step of ATC alone on random features: K = int(keep rate x N) clusters from cosine "
        f"distances, per back end the median time of one call on B images, and its agreement with "
        f"{reference}: the fraction of images whose partition is identical (and the mean adjusted Rand "
        f"index). A back end whose 'agrees' is NO computes different clusters.",
    )
    ok = clustering[clustering.status == "ok"]
    for (n, b), part in ok.groupby(["num_points", "batch_size"], sort=True):
        table = pd.DataFrame({
            "linkage": part.linkage,
            "backend": part.backend,
            "device": part.device,
            "ms": part.median_ms.astype(float),
            "ms/image": part.ms_per_image.astype(float),
            f"speed-up vs {reference}": part.speedup_vs_reference.astype(float),
            "agreement": part.agreement.astype(float),
            "ARI": part.ari.astype(float),
            "agrees": part.agrees.map(lambda v: str(v).lower() == "true"),
        })
        section.tables.append((f"N = {n} points, B = {b} images, K = {int(part.num_clusters.iloc[0])}", table))
    bad = ok[~ok.agrees.map(lambda v: str(v).lower() == "true")]
    for _, row in bad.iterrows():
        section.notes.append(
            f"DISAGREEMENT: {row.backend} ({row.linkage}, N={row.num_points}, B={row.batch_size}) matches "
            f"{reference} on {row.agreement:.0%} of images (mean ARI {row.ari:.3f})."
        )
    skipped = clustering[clustering.status != "ok"][["backend", "status"]].drop_duplicates()
    for _, row in skipped.iterrows():
        section.notes.append(f"{row.backend}: {row.status}")
    return section


def table_names(paths: Sequence[PathLike]) -> List[Tuple[str, Path]]:
    """(name, path) per table: the path below the tables' common folder,
    without the suffix (``digits/correlations_rates``)."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return [(paths[0].stem, paths[0])]
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [(str(p.relative_to(common).with_suffix("")), p) for p in paths]


def stage_section(title: str, tables: Iterable[Tuple[str, PathLike]], intro: str = "") -> Section:
    """Any stage's CSV/TSV tables as they are (cut to MAX_ROWS rows)."""
    section = Section(title, intro)
    for name, path in tables:
        path = Path(path)
        frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
        if len(frame) > MAX_ROWS:
            section.notes.append(f"{name}: first {MAX_ROWS} of {len(frame)} rows (all in {path.name}).")
            frame = frame.head(MAX_ROWS)
        section.tables.append((name, frame))
    return section


def config_section(config: Mapping[str, Any]) -> Section:
    """What the run was asked to do: datasets, backbones, methods, the
    fine-tuning grid and the benchmark settings."""
    section = Section("Configuration", "The workflow configuration this report was built from (full YAML in the "
                                        "report's Configuration page).")
    datasets = pd.DataFrame([{"dataset": k, "kind": v.get("kind"), "img_size": v.get("img_size")}
                             for k, v in config.get("datasets", {}).items()])
    backbones = pd.DataFrame([{"backbone": k, "model": v.get("model"), "init": v.get("init"),
                               "model_kwargs": json.dumps(v.get("model_kwargs") or {}, sort_keys=True)}
                              for k, v in config.get("backbones", {}).items()])
    grid = pd.DataFrame([{"datasets": " ".join(e["datasets"]), "backbones": " ".join(e["backbones"]),
                          "methods": " ".join(e["methods"]), "keep_rates": " ".join(f"{r:g}" for r in e["keep_rates"])}
                         for e in config.get("experiments", [])])
    for name, table in (("Datasets", datasets), ("Backbones", backbones), ("Fine-tuning grid", grid)):
        if len(table):
            section.tables.append((name, table))
    section.notes.append(f"Reduction at blocks {config.get('reduction_loc')}, budget {config.get('budget')!r}, "
                         f"seeds {config.get('seeds')}.")
    return section


def config_page(config: Mapping[str, Any]) -> str:
    """A self-contained HTML page with the config as YAML and its summary."""
    import yaml

    page = render_html(config_section(config))
    text = yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False)
    block = f"<h2>config.yaml</h2><pre id='config'>{html.escape(text)}</pre>"
    return page.replace("</body></html>", block + "</body></html>")


def index_markdown(config: Mapping[str, Any], sections: Sequence[Section], report_path: Optional[str] = None) -> str:
    """results/README.md: the configuration summary and every section's tables."""
    preamble = "Every table of this run, as plain Markdown (CSV files beside them hold all columns)."
    if report_path:
        preamble += f" The HTML report with the figures: `snakemake --report {report_path}`."
    return render_markdown([config_section(config), *sections], "Results", preamble)

"""Tables of the report: one HTML page per section, the configuration page, the
accuracy-vs-throughput figure, and the Markdown index results/README.md.

    python scripts/report.py section --section speed --title T --tables speed.csv --out speed.html
    python scripts/report.py config --config JSON --out config.html
    python scripts/report.py tradeoff --summary metrics.csv --speed speed.csv --out plot.png
    python scripts/report.py index --config JSON --summary metrics.csv [--speed speed.csv] \
        [--clustering clustering.csv] [--stage NAME PATH ...] --out README.md
"""
import argparse
import json

import pandas as pd

from tokenreduction import report


def build_section(kind: str, paths, title: str = "") -> report.Section:
    if kind == "summary":
        return report.summary_section(pd.read_csv(paths[0]))
    if kind == "speed":
        return report.speed_section(pd.read_csv(paths[0]))
    if kind == "clustering":
        return report.clustering_section(pd.read_csv(paths[0]))
    return report.stage_section(title or kind, report.table_names(paths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sec = sub.add_parser("section", help="one section as an HTML page")
    sec.add_argument("--section", required=True, help="summary | speed | clustering | a stage name")
    sec.add_argument("--title", default="")
    sec.add_argument("--tables", nargs="*", default=[])
    sec.add_argument("--out", required=True)
    cfg = sub.add_parser("config", help="the configuration as an HTML page")
    cfg.add_argument("--config", required=True, help="the config as JSON")
    cfg.add_argument("--out", required=True)
    trade = sub.add_parser("tradeoff", help="accuracy against measured throughput ratio")
    trade.add_argument("--summary", required=True)
    trade.add_argument("--speed", required=True)
    trade.add_argument("--out", required=True)
    idx = sub.add_parser("index", help="results/README.md")
    idx.add_argument("--config", required=True, help="the config as JSON")
    idx.add_argument("--summary", required=True)
    idx.add_argument("--speed")
    idx.add_argument("--clustering")
    idx.add_argument("--stage", nargs="+", action="append", default=[], metavar=("NAME", "PATH"),
                     help="a stage's title (first) and its tables; repeat per stage")
    idx.add_argument("--report-path", default="results/report.html")
    idx.add_argument("--out", required=True)
    args = parser.parse_args()

    if args.command == "section":
        section = build_section(args.section, args.tables, args.title)
        report.write_text(args.out, report.render_html(section))
    elif args.command == "config":
        report.write_text(args.out, report.config_page(json.loads(args.config)))
    elif args.command == "tradeoff":
        from tokenreduction.benchmark.plots import plot_accuracy_vs_throughput

        plot_accuracy_vs_throughput(pd.read_csv(args.summary), pd.read_csv(args.speed), args.out)
    else:
        sections = [build_section("summary", [args.summary])]
        if args.speed:
            sections.append(build_section("speed", [args.speed]))
        if args.clustering:
            sections.append(build_section("clustering", [args.clustering]))
        for name, *paths in args.stage:
            if paths:
                sections.append(build_section(name, paths, name))
        text = report.index_markdown(json.loads(args.config), sections, args.report_path)
        report.write_text(args.out, text)


if __name__ == "__main__":
    main()

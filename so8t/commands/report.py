"""``so8t report RUN [RUN ...]``: rebuilds each run's monitoring plots and summary.json from metrics.jsonl
alone (no model, no torch) and prints its latest values per layer; with two runs or more (a gated run
and its ``--no-so8t`` baseline, say) it also draws them on the same axes.

Each ``RUN`` is a run's output directory or its ``monitoring/`` directory. Missing or unreadable files
end with a one-line message and exit status 2; a file with no samples yet, with status 1.
"""

import argparse
import sys
from pathlib import Path

from ..monitor.losses import LOSS_LABELS
from ..monitor.plots import draw_comparison
from ..monitor.recorder import METRICS_FILE
from ..monitor.metrics_log import MetricsFileError
from ..monitor.report import (
    COMPARISON_DIR,
    Report,
    default_compare_dir,
    find_monitoring_dir,
    format_number,
    format_report,
    rebuild,
    run_names,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directories", nargs="+", type=Path, metavar="RUN",
                        help="a run's output directory, or its monitoring/ directory; two or more are also "
                             "drawn on the same axes")
    parser.add_argument("--compare-dir", type=Path, metavar="DIR",
                        help="where the plots of several runs go (default: the first run's "
                             f"monitoring/{COMPARISON_DIR}/<the other runs' names>/)")


def run(args: argparse.Namespace) -> int:
    reports = []
    try:
        for directory in args.directories:
            monitoring = find_monitoring_dir(directory)
            series, summary, plots = rebuild(monitoring)
            if not len(series):
                print(f"so8t report: {monitoring / METRICS_FILE} has no samples yet (the first is taken at step 1)",
                      file=sys.stderr)
                return 1
            reports.append(Report(monitoring, series, summary, plots))
        compared = None
        if len(reports) > 1:
            names = run_names(args.directories)
            target = args.compare_dir or default_compare_dir(reports[0].monitoring, names)
            compared = target, draw_comparison([(name, r.series) for name, r in zip(names, reports)], target)
    except MetricsFileError as error:
        print(f"so8t report: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"so8t report: cannot read or write the monitoring files: {error}", file=sys.stderr)
        return 2
    print("\n\n".join(format_report(r.monitoring, r.series, r.summary, r.plots) for r in reports))
    if compared is not None:
        target, plots = compared
        print(f"\nruns on the same axes ({', '.join(names)}): {target}/ ({', '.join(p.name for p in plots)})")
        for key, label in LOSS_LABELS.items():
            finals = [r.summary.get("losses", {}).get(key) for r in reports]
            if any(finals):
                print(f"final {label}: " + ", ".join(
                    f"{name} {format_number(final['final']) if final else '-'}" for name, final in zip(names, finals)))
    return 0

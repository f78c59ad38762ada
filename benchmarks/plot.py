"""Write the markdown tables of a benchmark results file and draw its PNG plots beside it.

    python benchmarks/plot.py benchmarks/results/nvidia-h100-80gb-hbm3-2026-01-31.json

Runs anywhere matplotlib is installed (no GPU, no vLLM): the tables go to ``<file stem>.md`` (and are
printed), the plots to ``<file stem>-capacity.png``, ``-throughput.png`` and ``-decode_kernel.png``, for
the benchmarks the file holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results JSON file(s) written by the benchmarks")
    args = parser.parse_args(argv)
    for path in args.results:
        if not path.is_file():
            parser.error(f"{path} does not exist")
        records = report.load_records(path)
        tables = report.markdown_tables(records)
        markdown = path.with_suffix(".md")
        markdown.write_text(tables + "\n")
        print(f"{path}\n\n{tables}\n\nwrote {markdown}")
        for png in report.plot_records(records, path.with_suffix("")):
            print(f"wrote {png}")


if __name__ == "__main__":
    main()

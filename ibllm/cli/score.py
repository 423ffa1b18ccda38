"""``python -m ibllm score mme RESULTS_DIR``: score per-subtask MME answer files the way the official tool does."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ibllm.evaluation import mme
from ibllm.evaluation.mme import report_lines, score_results_dir


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m ibllm score``."""
    parser = argparse.ArgumentParser(prog="python -m ibllm score", description=mme.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["mme"], help="which benchmark's results to score")
    parser.add_argument("results", help="folder of per-subtask <task>.txt files (image<TAB>question<TAB>gt<TAB>response)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm score mme RESULTS_DIR``: prints the per-subtask scores and the two totals."""
    args = build_parser().parse_args(argv)
    try:
        scores, totals, missing = score_results_dir(args.results)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if missing:
        print(f"warning: no results for {', '.join(missing)} (totals cover the subtasks present)", file=sys.stderr)
    print("\n".join(report_lines(scores, totals)))

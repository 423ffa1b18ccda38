"""``python -m ibllm score mme RESULTS_DIR``: score per-subtask MME answer files the way the official tool does."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ibllm.evaluation import mme
from ibllm.evaluation.mme import report_lines, score_results_dir
from ibllm.verbs.registry import run, verb


@verb("score mme", positional=("results",), description=mme.__doc__)
def score_mme(results: str) -> None:
    """Score MME answers: prints the per-subtask scores and the two totals.

    Args:
        results: folder of per-subtask <task>.txt files (image<TAB>question<TAB>gt<TAB>response)
    """
    try:
        scores, totals, missing = score_results_dir(results)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if missing:
        print(f"warning: no results for {', '.join(missing)} (totals cover the subtasks present)", file=sys.stderr)
    print("\n".join(report_lines(scores, totals)))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm score mme RESULTS_DIR``."""
    run("score", argv)

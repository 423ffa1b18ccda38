"""The method learns: stages 1 and 2 of the digits demo, really trained (fixed seeds, the scikit-learn digits,
the demo's stage-0 towers, SmolLM2's first blocks), raise held-out accuracy measured by the demo's own metrics
(:class:`DigitCaptionAccuracy`: the greedy caption names exactly the right digit; :class:`DigitInstructionAccuracy`:
the answer's last number word / even / odd matches the reference's).

Each check is also run with every AdamW learning rate scaled by 1e-3, and must then fail: the tests catch a
change that stops the method from learning. Sizes and settings: ``digits_training.py``.
"""

from __future__ import annotations

import pytest

from digits_training import STAGE1, STAGE2, StageRun, crippled, train_stage1, train_stage2

STAGE1_THRESHOLD = 0.7  # held-out caption accuracy after training (untrained: ~0)
STAGE1_MARGIN = 0.5
STAGE2_MARGIN = 0.15  # held-out instruction accuracy gained over the stage-1 model's


def check_stage1(run: StageRun) -> None:
    """Stage 1 learned: captions name the right digit for most held-out images, far more than before."""
    assert run.before <= 0.2, f"untrained model already scores {run.before:.2f}"
    assert run.after >= STAGE1_THRESHOLD, f"held-out caption accuracy {run.after:.2f} < {STAGE1_THRESHOLD}"
    assert run.after - run.before >= STAGE1_MARGIN, f"{run.before:.2f} -> {run.after:.2f}"


def check_stage2(run: StageRun) -> None:
    """Stage 2 learned: held-out digit questions answered clearly better than by the stage-1 model."""
    assert run.after - run.before >= STAGE2_MARGIN, f"held-out instruction accuracy {run.before:.2f} -> {run.after:.2f}"


def test_stage1_learns(digits_stage1) -> None:
    print(f"stage 1: {digits_stage1}")
    check_stage1(digits_stage1)


def test_stage1_check_fails_when_learning_is_crippled(digits_demo, digits_stage1) -> None:
    run = crippled(lambda: train_stage1(digits_demo, None))
    print(f"stage 1, AdamW lr x 1e-3: {run}")
    assert run.peak_lrs and all(lr == pytest.approx(STAGE1["lr"] * 1e-3) for lr in run.peak_lrs), run.peak_lrs
    with pytest.raises(AssertionError):
        check_stage1(run)


def test_stage2_learns(digits_demo, digits_stage1, tmp_path) -> None:
    run = train_stage2(digits_demo, digits_stage1.checkpoint, tmp_path)
    print(f"stage 2: {run}")
    check_stage2(run)


def test_stage2_check_fails_when_learning_is_crippled(digits_demo, digits_stage1) -> None:
    run = crippled(lambda: train_stage2(digits_demo, digits_stage1.checkpoint, None))
    print(f"stage 2, AdamW lr x 1e-3: {run}")
    assert run.peak_lrs and all(lr == pytest.approx(STAGE2["lr"] * 1e-3) for lr in run.peak_lrs), run.peak_lrs
    with pytest.raises(AssertionError):
        check_stage2(run)

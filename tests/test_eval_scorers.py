"""Every evaluation scorer against hand-computed expectations (EVAL.md's protocol facts)."""

from __future__ import annotations

import math

import pytest

from ibllm.evaluation import cider, kie, mme, ocr, visdial, vqa
from ibllm.evaluation.text import has_word, normalize_vqa


# ---- MME -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, parsed", [
    ("Yes", "yes"), ("no", "no"), ("Yes.", "yes"), ("yes, it is", "yes"), ("nope", "no"), ("other", "other"),
    ("Not sure", "no"), ("I think yes", "other"),  # "yes" after the first 4 characters does not count
    (" yes", "yes"), ("  yes", "other"),  # the 4-character window includes leading spaces
    ("", "other"), ("know", "no"),
])
def test_mme_parsing(response, parsed):
    assert mme.parse_yes_no(response) == parsed


def rows(*triples):
    out = []
    for i, (gt, resp) in enumerate(triples):
        out.append(mme.MMERow(f"img{i // 2}.jpg", "Is it? Please answer yes or no.", gt, resp))
    return out


def test_mme_acc_acc_plus_and_score():
    # 3 images: both right / one right / both wrong ("other" is wrong).
    r = rows(("Yes", "Yes."), ("No", "nope"), ("Yes", "yes, it is"), ("No", "yes"), ("Yes", "other"), ("No", "Yes"))
    s = mme.score_rows(r)
    assert s.acc == pytest.approx(3 / 6) and s.acc_plus == pytest.approx(1 / 3)
    assert s.score == pytest.approx(100 * (0.5 + 1 / 3))


def test_mme_pairs_must_be_consecutive():
    with pytest.raises(ValueError, match="consecutive"):
        mme.score_rows([mme.MMERow("a.jpg", "q", "Yes", "yes"), mme.MMERow("b.jpg", "q", "No", "no")])
    with pytest.raises(ValueError, match="3 lines"):
        mme.score_rows(rows(("Yes", "yes"), ("No", "no"), ("Yes", "yes")))


def test_mme_totals_and_results_dir(tmp_path):
    perfect = [("a.jpg", "q1", "Yes", "Yes"), ("a.jpg", "q2", "No", "No")]
    half = [("a.jpg", "q1", "Yes", "Yes"), ("a.jpg", "q2", "No", "Yes"),
            ("b.jpg", "q1", "Yes", "Yes"), ("b.jpg", "q2", "No", "no")]  # acc 0.75, acc+ 0.5 -> 125
    mme.write_results_files({"existence": perfect, "count": half, "code_reasoning": perfect}, tmp_path)
    assert (tmp_path / "count.txt").read_text().splitlines()[1] == "a.jpg\tq2\tNo\tYes"
    scores, totals, missing = mme.score_results_dir(tmp_path)
    assert scores["existence"].score == 200 and scores["count"].score == 125
    assert totals == {"perception": 325, "cognition": 200}
    assert "OCR" in missing and "existence" not in missing
    lines = mme.report_lines(scores, totals)
    assert lines[-2:] == ["mme_perception: 325.00", "mme_cognition: 200.00"]


def test_mme_results_line_format_survives_tabs_and_newlines(tmp_path):
    mme.write_results_files({"OCR": [("x.png", "q", "Yes", "Yes\tit\nis")] * 2}, tmp_path)
    (row, _) = mme.read_results_file(tmp_path / "OCR.txt")
    assert row.response == "Yes it is" and row.correct()


def test_score_command_prints_totals_last(tmp_path, capsys):
    mme.write_results_files({"color": [("a.jpg", "q1", "Yes", "Yes"), ("a.jpg", "q2", "No", "no")]}, tmp_path)
    from ibllm.cli import main

    main(["score", "mme", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2:] == ["mme_perception: 200.00", "mme_cognition: 0.00"]
    assert any(line.startswith("color") for line in out)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "OCR.txt").write_text("only\ttwo\n")
    with pytest.raises(SystemExit, match="OCR.txt:1"):
        main(["score", "mme", str(tmp_path / "bad")])


# ---- OCR / VQA / VisDial / KIE ----------------------------------------------------------------------
def test_ocr_word_accuracy():
    assert ocr.clean_ocr("Hello, World!") == "hello world"
    assert ocr.ocr_correct("The word is 'STOP'.", "stop")
    assert not ocr.ocr_correct("stopping", "stop")  # whole words only
    assert ocr.ocr_correct("it says co-op", "coop")  # '-' is removed from both before matching
    assert not ocr.ocr_correct("anything", "!!!")  # a ground truth with nothing left never matches
    assert ocr.ocr_accuracy(["stop sign", "go", "yield"], ["STOP", "stop", "Yield!"]) == pytest.approx(200 / 3)


def test_vqa_normalisation():
    assert normalize_vqa("Two dogs.") == "2 dogs"
    assert normalize_vqa("The answer is: a RED car!") == "answer is: red car"
    assert normalize_vqa("dont know") == "don't know"
    assert normalize_vqa("3.5 kg") == "3.5 kg"
    assert normalize_vqa("yes, it is") == "yes it is"  # ", " touches a space: deleted
    assert normalize_vqa("black/white") == "black white"  # "/" touches no space: becomes one
    assert normalize_vqa("1,000 people") == "1000 people"  # digit,comma,digit: commas deleted


def test_vqa_accuracy_any_gt_whole_word():
    assert vqa.vqa_correct("There are two dogs.", ["2"])
    assert vqa.vqa_correct("It is a tennis racket", ["baseball bat", "racket"])
    assert not vqa.vqa_correct("rackets", ["racket"])
    assert not vqa.vqa_correct("no", ["none"])  # "none" -> "0"
    assert vqa.vqa_accuracy(["yes", "No, it is not.", "maybe"], ["yes", ["no"], ["yes"]]) == pytest.approx(200 / 3)


def test_has_word():
    assert has_word("a red car", "red car") and not has_word("a redcar", "red")
    assert not has_word("anything", "")


def test_visdial_reciprocal_rank_first_matching_option_in_file_order():
    options = ["no", "yes", "2", "i think so", "yes it is"]
    assert visdial.reciprocal_rank("Yes it is.", options) == pytest.approx(1 / 2)  # "yes" (index 1) first
    assert visdial.reciprocal_rank("There are two.", options) == pytest.approx(1 / 3)
    assert visdial.reciprocal_rank("Maybe", options) == 0.0
    assert visdial.visdial_mrr(["no", "two", "maybe"], [options] * 3) == pytest.approx(100 * (1 + 1 / 3) / 3)


def test_kie_micro_f1():
    # sample 1: pred "Total 12.00" vs gt "Total 12.00 USD" -> 2 matched of 2 pred / 3 gt
    # sample 2: pred "a a b" vs gt "a c" -> 1 matched (multiset) of 3 pred / 2 gt; case-sensitive: "total" != "Total"
    assert kie.kie_counts("a a b", "a c") == (1, 3, 2)
    assert kie.kie_counts("total", "Total") == (0, 1, 1)
    p, r = 3 / 5, 3 / 5
    assert kie.kie_f1(["Total 12.00", "a a b"], ["Total 12.00 USD", "a c"]) == pytest.approx(100 * 2 * p * r / (p + r))
    assert kie.kie_f1(["x"], ["y"]) == 0.0


# ---- CIDEr-D ---------------------------------------------------------------------------------------
def test_cider_d_hand_computed():
    # Two images, N = 2, idf of an n-gram seen in one image's references = log 2.
    # Image A: candidate == reference "a b": cos = 1 for n = 1, 2; no 3/4-grams -> (1 + 1 + 0 + 0) / 4 x 10 = 5.
    # Image B: "c" vs "c d": n=1 cos = log2*log2 / (log2 * sqrt(2) log2) = 1/sqrt(2); delta = 0 - 1
    #          -> (1/sqrt(2)) * exp(-1/72) / 4 x 10.
    corpus, per = cider.cider_d(["a b", "c"], [["a b"], ["c d"]])
    expected_b = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    assert per == pytest.approx([5.0, expected_b])
    assert corpus == pytest.approx((5.0 + expected_b) / 2)


def test_cider_d_single_image_is_zero_and_clipping():
    assert cider.cider_d(["a b"], [["a b"]])[0] == 0.0  # idf = log 1 - log 1 = 0
    # Clipping: repeating a word cannot raise the dot product above the reference's own tf-idf.
    _, (rep, _) = cider.cider_d(["x x x y", "z"], [["x y", "x y z w"], ["q"]])
    _, (once, _) = cider.cider_d(["x y", "z"], [["x y", "x y z w"], ["q"]])
    assert rep < once


def test_cider_raw_vs_ptb_modes():
    assert cider.ptb_tokenize("A man's dog, running. Don't!") == ["a", "man", "'s", "dog", "running", "do", "n't"]
    assert cider.words("A Dog.", "raw") == ["A", "Dog."]
    cands, refs = ["A dog runs.", "Two cats"], [["a dog runs"], ["two cats sleep"]]
    raw, _ = cider.cider_d(cands, refs, "raw")
    ptb, _ = cider.cider_d(cands, refs, "ptb")
    assert ptb > raw  # case and punctuation no longer break matches
    with pytest.raises(ValueError, match="word mode"):
        cider.cider_d(cands, refs, "bpe")


def test_bleu_rouge_from_torchmetrics():
    out = cider.bleu_rouge(["a cat sits on the mat"], [["a cat sits on the mat"]])
    assert out["bleu4"] == pytest.approx(100.0) and out["rougeL"] == pytest.approx(100.0)

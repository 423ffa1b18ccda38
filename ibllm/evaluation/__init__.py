"""Evaluation harness: the paper's protocols (MME; LVLM-eHub OCR / VQA / KIE / VisDial / captioning).

* scorers, one module per metric: :mod:`.mme`, :mod:`.ocr`, :mod:`.vqa`, :mod:`.visdial`, :mod:`.kie`,
  :mod:`.cider` (CIDEr-D raw / PTB-tokenised, BLEU / ROUGE from torchmetrics); shared text rules in :mod:`.text`;
* :mod:`.readers` (on-disk formats, MME layout auto-detection, the easy-VQA data from PyPI);
* :mod:`.prompts` (the paper's prompts and decoding settings);
* :mod:`.runner` (answering over ranks, scoring, answers files), used by ``python -m ibllm evaluate``
  (:mod:`ibllm.cli.evaluate`) and the training callback; ``python -m ibllm score mme DIR`` is
  :mod:`ibllm.cli.score`.
"""

from ibllm.evaluation.cider import cider_d, ptb_tokenize
from ibllm.evaluation.kie import kie_f1
from ibllm.evaluation.mme import parse_yes_no, score_results_dir
from ibllm.evaluation.ocr import ocr_accuracy
from ibllm.evaluation.prompts import EvalSettings, build_prompt
from ibllm.evaluation.readers import Sample, read_task
from ibllm.evaluation.visdial import visdial_mrr
from ibllm.evaluation.vqa import vqa_accuracy

__all__ = ["EvalSettings", "Sample", "build_prompt", "cider_d", "kie_f1", "ocr_accuracy", "parse_yes_no",
           "ptb_tokenize", "read_task", "score_results_dir", "visdial_mrr", "vqa_accuracy"]

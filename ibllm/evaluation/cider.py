"""CIDEr-D for captioning, plus BLEU-4 / ROUGE-L from torchmetrics.

CIDEr-D (Vedantam et al.; the COCO caption evaluation's variant):

* n-grams n = 1..4 of the candidate and of each reference (words from :func:`words`);
* document frequency ``df(g)`` = number of evaluated images whose references contain ``g``; the idf is
  ``log(N) - log(max(1, df))`` with N the number of evaluated images (so scores depend on the set);
* per n, tf-idf vectors (raw counts x idf); similarity = sum over the candidate's n-grams of
  ``min(cand, ref) x ref`` (clipping) divided by both vector norms, times the length penalty
  ``exp(-delta^2 / (2 sigma^2))``, sigma = 6, delta = (candidate words - 1) - (reference words - 1);
* image score = mean over n, mean over references, x 10; corpus score = mean over images.

Two word modes: ``"raw"`` splits the text on whitespace (what LVLM-eHub, hence the paper's numbers,
did: ~24 % below tokenised CIDEr) and ``"ptb"`` applies :func:`ptb_tokenize`, a Python approximation
of the PTB tokenizer of the COCO caption tools (lowercase, split punctuation and clitics, drop
punctuation tokens).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

SIGMA = 6.0
MAX_N = 4
# The paper's zero-shot CIDEr (ImageBind-LLM; LVLM-eHub protocol: raw whitespace words, x 100).
PAPER_CAPTION = {"NoCaps": 30.43, "Flickr-30k": 23.04}

_DROP = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";",
         "(", ")", "[", "]", "{", "}", '"'}
_TOKEN = re.compile(r"""(?x)
      \.\.\.                     # ellipsis
    | --                         # dash pair
    | n't\b                      # clitic n't
    | '(?:s|re|ve|ll|d|m)\b      # clitics
    | [a-z0-9]+(?:[.'&/-][a-z0-9]+)*?(?=n't\b)   # word before n't
    | [a-z0-9]+(?:[.&/-][a-z0-9]+)*              # words, numbers (3.5, e-mail, a&b)
    | [^\sa-z0-9]                # any other single symbol
""")


def ptb_tokenize(text: str) -> list[str]:
    """PTB-like tokens: lowercase; ``don't`` -> ``do n't``, ``man's`` -> ``man 's``; punctuation split
    off and dropped (the COCO tools' punctuation list)."""
    tokens = _TOKEN.findall(text.lower().replace("\u2019", "'"))
    return [t for t in tokens if t not in _DROP]


def words(text: str, mode: str = "raw") -> list[str]:
    """The words CIDEr counts: whitespace split (``raw``) or :func:`ptb_tokenize` (``ptb``)."""
    if mode == "raw":
        return text.split()
    if mode == "ptb":
        return ptb_tokenize(text)
    raise ValueError(f"unknown CIDEr word mode {mode!r} (use 'raw' or 'ptb')")


def ngram_counts(tokens: Sequence[str], max_n: int = MAX_N) -> list[Counter]:
    """Counts of the 1..max_n-grams of ``tokens`` (one Counter per n)."""
    return [Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)) for n in range(1, max_n + 1)]


def _tfidf(counts: list[Counter], df: Counter, log_n: float) -> tuple[list[dict], list[float]]:
    vectors, norms = [], []
    for per_n in counts:
        vec = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in per_n.items()}
        vectors.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    return vectors, norms


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], mode: str = "raw",
            sigma: float = SIGMA) -> tuple[float, list[float]]:
    """CIDEr-D of paired candidates / reference lists: (corpus score, per-image scores), both on the x10 scale."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"caption sample {i} has no reference")
    ref_counts = [[ngram_counts(words(r, mode)) for r in refs] for refs in references]
    df: Counter = Counter()
    for per_image in ref_counts:
        df.update({g for per_ref in per_image for per_n in per_ref for g in per_n})
    log_n = math.log(float(len(candidates)))
    scores = []
    for cand, per_image in zip(candidates, ref_counts):
        cand_words = words(cand, mode)
        c_vec, c_norm = _tfidf(ngram_counts(cand_words), df, log_n)
        c_len = max(0, len(cand_words) - 1)
        total = 0.0
        for per_ref in per_image:
            r_vec, r_norm = _tfidf(per_ref, df, log_n)
            r_len = sum(per_ref[1].values())  # number of bigrams = words - 1
            delta = c_len - r_len
            sims = []
            for n in range(MAX_N):
                dot = sum(min(v, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, v in c_vec[n].items())
                sim = dot / (c_norm[n] * r_norm[n]) if c_norm[n] and r_norm[n] else 0.0
                sims.append(sim * math.exp(-(delta ** 2) / (2 * sigma ** 2)))
            total += sum(sims) / MAX_N
        scores.append(10.0 * total / len(per_image))
    return sum(scores) / len(scores), scores


def bleu_rouge(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and ROUGE-L F (torchmetrics), both x100."""
    from torchmetrics.text import BLEUScore  # torchmetrics' text metrics are slow to import; only captions need them
    from torchmetrics.text.rouge import ROUGEScore

    bleu = BLEUScore(n_gram=4)(list(candidates), [list(r) for r in references])
    rouge = ROUGEScore(rouge_keys="rougeL", accumulate="best")(list(candidates), [list(r) for r in references])
    return {"bleu4": 100.0 * float(bleu), "rougeL": 100.0 * float(rouge["rougeL_fmeasure"])}

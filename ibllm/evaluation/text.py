"""Text normalisation shared by the scorers: whole-word matching and the VQAv2 answer normalisation.

VQAv2 normalisation (:func:`normalize_vqa`), the rules of the VQAv2 evaluation:

1. newlines / tabs become spaces, the text is stripped;
2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: each mark is deleted when it touches a
   space (``"a ,"`` / ``", b"``) or when the text has a digit-comma-digit group, otherwise it becomes a space;
   a period not followed by a digit is deleted (``"3.5"`` keeps its period);
3. lowercase, split on whitespace; number words ``none``/``zero``..``ten`` become digits; the articles
   ``a an the`` are dropped; apostrophe-less contractions are restored (``dont`` -> ``don't``).
"""

from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't it'd it'd've it'll it's let's "
    "ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd she'd've "
    "she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd "
    "someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've "
    "there're there's they'd they'd've they'll they're they've wasn't we'd we'd've we'll we're we've weren't "
    "what'll what're what's what've when's where'd where's where've who'd who'd've who'll who're who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll "
    "you're you've"
).split()
# "dont" -> "don't" (only words that are not themselves English words without the apostrophe).
CONTRACTIONS = {w.replace("'", ""): w for w in _CONTRACTED
                if w.replace("'", "") not in {"hell", "id", "ill", "its", "shell", "well", "were", "wed", "cant", "wont", "lets", "shed"}}
CONTRACTIONS.update({"cant": "can't", "wont": "won't"})


def has_word(text: str, word: str) -> bool:
    """Whether ``word`` (one or more words) occurs in ``text`` delimited by word boundaries.

    An empty ``word`` never matches (a bare ``\\b\\b`` pattern would match any text).
    """
    if not word:
        return False
    return re.search(r"\b" + re.escape(word) + r"\b", text) is not None


def strip_punctuation(text: str) -> str:
    """VQAv2 punctuation rule (step 2 of the module doc)."""
    out = text
    comma_group = DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or comma_group:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_words(text: str) -> str:
    """VQAv2 step 3: lowercase, number words to digits, drop articles, restore contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa(text: str) -> str:
    """The full VQAv2 answer normalisation (module doc)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(strip_punctuation(text))

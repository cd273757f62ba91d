"""The official VQA accuracy of VQAv2 and of VizWiz: answer processing and the 10-way leave-one-out score.

VQAv2 follows the current revision of the challenge's `vqaEval.py` (GT-Vision-Lab/VQA, March 2021,
"Fixed processing answers bug"), applied as the evaluation server applies it: the server first puts
every machine answer through its answer processor (the one MMF reproduces as
`EvalAIAnswerProcessor`): a word step (lower case; `,` and `?` removed; `'s` split off as a word of
its own), then the script's punctuation and digit/article steps. The script then processes both sides
or neither: when the ten human answers disagree, the prediction and every human answer get the
punctuation and digit/article steps; when they all agree, they are compared with the prediction as
they are.

VizWiz follows the VizWiz challenge's own `VQAEval.evaluate`: the prediction always gets the
punctuation and digit/article steps (no word step), the human answers never do, and nothing else is
remapped (a prediction such as "i don't know" does not count as "unanswerable"; legacy "unsuitable"
human answers stay as they are). Its contraction table restores most apostrophes as the curly `’`.

Both score a prediction as min(1, matches / 3) against each subset of nine of the ten human answers,
leaving out one answer by position, and average the ten subset scores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
# The VizWiz script's table holds the same entries typed with the curly apostrophe, but for two keys
# and eight values that kept the straight one.
_VIZWIZ_STRAIGHT_KEYS = {"couldn'tve", "hadn'tve"}
_VIZWIZ_STRAIGHT_VALUES = {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"}
VIZWIZ_CONTRACTIONS = {
    (key if key in _VIZWIZ_STRAIGHT_KEYS else key.replace("'", "’")): (
        value if key in _VIZWIZ_STRAIGHT_VALUES else value.replace("'", "’")
    )
    for key, value in CONTRACTIONS.items()
}
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# The official pattern reads "(?!<=\d)", a typo for a look-behind: it removes every period that is
# not followed by a digit (so "2.5" keeps its point, "yes." loses it). Kept as is for equal numbers.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# Every official script passes `re.UNICODE` (32) where `sub` takes its count: at most 32 periods go.
PERIODS_STRIPPED = 32


def normalize_punctuation(text: str) -> str:
    """Drop a punctuation mark next to a space (or anywhere, in text with a digit grouping comma),
    otherwise turn it into a space; then strip periods that are not decimal points."""
    out = text
    drop_everywhere = COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if drop_everywhere or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=PERIODS_STRIPPED)


def normalize_words(text: str, contractions: dict[str, str] = CONTRACTIONS) -> str:
    """Lower-case, number words to digits, articles dropped, contractions given their apostrophes."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [contractions.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str, contractions: dict[str, str] = CONTRACTIONS) -> str:
    """The official answer processing: punctuation, then number words, articles and contractions."""
    return normalize_words(normalize_punctuation(answer), contractions)


def server_answer(prediction: str) -> str:
    """A machine answer as the VQA evaluation server hands it to `vqaEval.py`: the word step, then
    the answer processing."""
    words = prediction.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return normalize_answer(_clean(words))


def _leave_one_out(answer: str, humans: Sequence[str]) -> float:
    matches = [h == answer for h in humans]
    total = sum(matches)
    # Leaving out answer i removes its own match (if any) from the count.
    return sum(min(1.0, (total - matched) / 3.0) for matched in matches) / len(matches)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQAv2 accuracy in [0, 1] of one predicted answer against the (usually ten) human answers."""
    if not human_answers:
        raise ValueError("a VQA question needs at least one human answer")
    answer = server_answer(prediction)
    humans = [_clean(a) for a in human_answers]
    if len(set(humans)) > 1:
        humans = [normalize_answer(a) for a in humans]
        answer = normalize_answer(answer)
    return _leave_one_out(answer, humans)


def vizwiz_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VizWiz accuracy in [0, 1]: the processed prediction against the human answers as they are."""
    if not human_answers:
        raise ValueError("a VizWiz question needs at least one human answer")
    return _leave_one_out(normalize_answer(_clean(prediction), VIZWIZ_CONTRACTIONS), list(human_answers))

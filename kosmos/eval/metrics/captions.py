"""Caption metrics through pycocoevalcap: CIDEr, BLEU-1..4, METEOR, ROUGE-L and SPICE.

Captions are tokenised the COCO way first: Stanford's PTB tokenizer (a Java program shipped inside
pycocoevalcap), lower-cased, with punctuation tokens removed. Where `java` is missing, a pure-Python
tokenizer that follows the same rules on ordinary captions stands in, and the result says so
(`tokenizer: "python"`): CIDEr, BLEU and ROUGE-L then still run; METEOR and SPICE, which are Java
programs themselves, are reported unavailable with the reason. SPICE also needs Stanford CoreNLP 3.6.0,
which pycocoevalcap would download on first use; nothing is downloaded here, so the message says where
to put it.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CAPTION_METRICS = ("cider", "bleu", "meteor", "rouge_l", "spice")
# The PTB tokens pycocoevalcap drops after tokenising (its own list, lower-cased output compared as is).
PTB_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}


def java_available() -> bool:
    return shutil.which("java") is not None


def _pycocoevalcap_dir() -> Path:
    import pycocoevalcap.cider

    return Path(pycocoevalcap.cider.__path__[0]).parent


def spice_unavailable_reason() -> str | None:
    lib = _pycocoevalcap_dir() / "spice" / "lib"
    missing = [
        n
        for n in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
        if not (lib / n).is_file()
    ]
    if missing:
        return (
            f"SPICE needs Stanford CoreNLP 3.6.0: put {' and '.join(missing)} into {lib} (from "
            "stanford-corenlp-full-2015-12-09.zip; pycocoevalcap.spice.get_stanford_models fetches it)"
        )
    return None


JAVA_MISSING = "needs Java: install a JRE (e.g. `apt-get install default-jre-headless`) so `java` is on PATH"


def metric_unavailable_reason(name: str, java: bool | None = None) -> str | None:
    """Why caption metric `name` cannot run here, or None when it can."""
    java = java_available() if java is None else java
    if name in ("meteor", "spice") and not java:
        return f"{name.upper()} {JAVA_MISSING}"
    if name == "spice":
        return spice_unavailable_reason()
    return None


# --- tokenisation -----------------------------------------------------------------------------------

# Double quotes become PTB quote tokens (dropped later); brackets keep their lower-cased PTB names.
_QUOTES_AND_BRACKETS = {
    '"': "''",
    "(": "-lrb-",
    ")": "-rrb-",
    "[": "-lsb-",
    "]": "-rsb-",
    "{": "-lcb-",
    "}": "-rcb-",
}
_SPLIT_WORDS = {
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "lemme": "lem me",
    "gimme": "gim me",
}
_ABBREVIATIONS = {
    "mr.",
    "mrs.",
    "ms.",
    "dr.",
    "st.",
    "jr.",
    "sr.",
    "vs.",
    "etc.",
    "inc.",
    "co.",
    "ltd.",
    "mt.",
    "no.",
    "prof.",
    "gen.",
    "sgt.",
    "capt.",
    "lt.",
    "col.",
    "ave.",
    "jan.",
    "feb.",
    "aug.",
    "sept.",
    "oct.",
    "nov.",
    "dec.",
}
# Abbreviations only before a number ("no. 5"); elsewhere their period ends the sentence ("the no.").
_NUMBER_ABBREVIATIONS = {"no."}
# Words PTB splits in its own way, and words it keeps whole although they start or end with "'".
_SPECIAL = {"'tis": ["'t", "is"], "'twas": ["'t", "was"], "y'all": ["y'", "all"]}
_WHOLE = re.compile(r"^('\d\ds|'n'?|'em|ol')$")
_FEET_INCHES = re.compile(r"^(\d+)'(\d+)(\"?)$")  # 5'10" and 5'10
_EMOTICON = re.compile(r"^[:;]-?[()]$")
_LEADING = re.compile(r"^([\"'`$#(\[{])")
_TRAILING = re.compile(r"([!?]+|[\"'`%*)\]},;:/#])$")
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m|'n)$")
# Inside a chunk: an ellipsis (two periods or more), a dash ("--"), a hashtag and "'n'" between words
# split it.
_INNER_SPLIT = re.compile(r"(\.{2,}|-{2,}|(?<=[a-z])'n'(?=[a-z]))|(?<=.)(?=#[a-z])")


def _kept(token: str) -> bool:
    """A token that keeps its leading and trailing marks."""
    return token in _SPECIAL or bool(_WHOLE.match(token))


def _keeps_its_start(token: str) -> bool:
    """A token whose leading mark stays, once its final punctuation is gone ("'80s.", "#tag!")."""
    word = token.rstrip(".!?,;:")
    return _kept(word) or (word[:1] == "#" and word[1:2].isalpha())


def _split_token(token: str, following: str = "") -> list[str]:
    """One lower-cased piece of a chunk into PTB tokens; `following` is the next piece of the caption."""
    if _EMOTICON.match(token):
        return [token.replace("(", "-lrb-").replace(")", "-rrb-")]
    if re.fullmatch(r"\.{2,}", token):
        return ["..."]
    head: list[str] = []
    tail: list[str] = []
    while token and not _keeps_its_start(token) and not _FEET_INCHES.match(token):
        match = _LEADING.match(token)
        if match is None:
            break
        head.append(match.group(1))
        token = token[len(match.group(1)) :]
    while token and not _kept(token) and not _FEET_INCHES.match(token):
        match = _TRAILING.search(token)
        if match is not None:
            tail.insert(0, match.group(1))
            token = token[: match.start()]
            continue
        # A final period is its own token unless the word is an abbreviation ("mr.", "u.s.", "p.m.").
        abbreviation = token in _ABBREVIATIONS and (
            token not in _NUMBER_ABBREVIATIONS or following[:1].isdigit()
        )
        if token.endswith(".") and len(token) > 1 and not abbreviation and "." not in token[:-1]:
            tail.insert(0, ".")
            token = token[:-1]
            continue
        break
    middle: list[str] = []
    feet_inches = _FEET_INCHES.match(token)
    if feet_inches:
        feet, inches, quote = feet_inches.groups()
        middle = [feet, "'", inches, "''"] if quote else [feet, f"'{inches}"]
    elif token in _SPECIAL:
        middle = list(_SPECIAL[token])
    elif _keeps_its_start(token):
        middle = [token]
    elif token in _SPLIT_WORDS:
        middle = _SPLIT_WORDS[token].split()
    elif re.fullmatch(r"-{2,}", token):
        middle = ["--"]
    else:
        # Peel contractions off the end ("shouldn't've" -> "should n't 've", "1990's" -> "1990 's").
        while (match := _CONTRACTION.match(token)) and re.search(r"[a-z0-9]", match.group(1)):
            middle.insert(0, match.group(2))
            token = match.group(1)
        if token:
            middle.insert(0, token)
    return [_QUOTES_AND_BRACKETS.get(t, t) for t in head + middle + tail]


def python_ptb_tokenize(caption: str) -> str:
    """A pure-Python stand-in for pycocoevalcap's PTB tokenisation of one caption.

    Lower-cases, splits punctuation, brackets (written -lrb- and so on, which pycocoevalcap keeps),
    contractions ("don't" -> "do n't", "1990's" -> "1990 's") and a few fused words ("cannot"), keeps
    numbers ("1,000", "2.50"), hyphenated words, abbreviations, decades ("'80s"), hashtags and
    "rock 'n' roll" whole, then drops punctuation tokens. It equals the Java tokenizer on the captions
    of `tests/test_eval_metrics.py` (their expected tokens come from the Java tokenizer); constructions
    outside those may differ, which is why a result scored with it says so.
    """
    pieces = [
        piece
        for chunk in caption.replace("\n", " ").lower().split()
        for piece in _INNER_SPLIT.split(chunk)
        if piece
    ]
    tokens = []
    for n, piece in enumerate(pieces):
        tokens.extend(_split_token(piece, pieces[n + 1] if n + 1 < len(pieces) else ""))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def tokenize(
    captions: Mapping[str, Sequence[str]], use_java: bool | None = None
) -> tuple[dict[str, list[str]], str]:
    """Tokenise every caption; returns the tokenised captions and which tokenizer ran ("ptb" or "python")."""
    if use_java is None:
        use_java = java_available()
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        nested = {key: [{"caption": c} for c in caps] for key, caps in captions.items()}
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            tokenized = PTBTokenizer().tokenize(nested)
        return {key: tokenized.get(key, []) for key in captions}, "ptb"
    return {key: [python_ptb_tokenize(c) for c in caps] for key, caps in captions.items()}, "python"


# --- scoring -----------------------------------------------------------------------------------------


@dataclass
class CaptionScores:
    """Corpus values (x100), per-caption scores where the corpus value is their mean, and what was skipped."""

    values: dict[str, float] = field(default_factory=dict)
    per_sample: dict[str, list[float]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "ptb"


def _scorer(name: str):
    if name == "cider":
        from pycocoevalcap.cider.cider import Cider

        return Cider()
    if name == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        return Bleu(4)
    if name == "meteor":
        from pycocoevalcap.meteor.meteor import Meteor

        return Meteor()
    if name == "rouge_l":
        from pycocoevalcap.rouge.rouge import Rouge

        return Rouge()
    if name == "spice":
        from pycocoevalcap.spice.spice import Spice

        return Spice()
    raise ValueError(f"unknown caption metric {name!r} (known: {', '.join(CAPTION_METRICS)})")


def caption_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Sequence[str] = CAPTION_METRICS,
    use_java: bool | None = None,
) -> CaptionScores:
    """Score one predicted caption per key against that key's reference captions."""
    if set(predictions) != set(references):
        raise ValueError("predictions and references must cover the same keys")
    for key, refs in references.items():
        if not refs:
            raise ValueError(f"sample {key!r} has no reference captions")
    if use_java is None:
        use_java = java_available()
        if not use_java:
            warnings.warn("java not found: captions tokenised by the pure-Python PTB stand-in", stacklevel=2)
    keys = sorted(predictions)
    # Distinct keys for predictions and references so one tokenizer call handles both.
    joined = {f"res\t{k}": [predictions[k]] for k in keys} | {f"gts\t{k}": list(references[k]) for k in keys}
    tokenized, tokenizer_name = tokenize(joined, use_java)
    res = {k: tokenized[f"res\t{k}"] for k in keys}
    gts = {k: tokenized[f"gts\t{k}"] for k in keys}
    out = CaptionScores(tokenizer=tokenizer_name)
    for name in metrics:
        reason = metric_unavailable_reason(name, java=use_java)
        if reason is not None:
            out.unavailable[name] = reason
            continue
        scorer = _scorer(name)
        with contextlib.redirect_stdout(io.StringIO()):
            corpus, per_sample = scorer.compute_score(gts, res)
        if name == "bleu":
            for n, value in enumerate(corpus, start=1):
                out.values[f"bleu_{n}"] = 100.0 * float(value)
        elif name == "spice":
            out.values[name] = 100.0 * float(corpus)
            out.per_sample[name] = [100.0 * float(s["All"]["f"]) for s in per_sample]
        else:
            out.values[name] = 100.0 * float(corpus)
            if name != "meteor":  # METEOR's corpus value pools statistics; it is not a mean
                out.per_sample[name] = [100.0 * float(s) for s in per_sample]
        del scorer  # METEOR's Java process ends with its wrapper
    return out

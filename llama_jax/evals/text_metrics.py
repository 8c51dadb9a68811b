"""Metrics of generated text, each computed as the tool people quote it from computes it.

- `exact_match`: equal after stripping surrounding whitespace, with lm-evaluation-harness's
  options (ignore case, punctuation, digits, or regular expressions).
- `rouge`: ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum as Google's `rouge-score` package
  computes them (its reimplementation of ROUGE-1.5.5): lower-cased text, every run of
  characters outside [a-z0-9] a word boundary, optional Porter stemming of words longer
  than three characters (`use_stemmer`, through nltk's stemmer), F1 of n-gram overlap or of
  the longest common subsequence; ROUGE-Lsum takes one sentence per line and the union of
  each reference sentence's LCS with every predicted sentence. Scores are in [0, 1].
- `bleu_stats` / `bleu_score`: sacreBLEU's BLEU (mteval-v13a tokenization, n-grams up to 4,
  the reference length closest to the hypothesis, "exp" smoothing); corpus BLEU sums the
  statistics over examples before scoring, as `sacrebleu.corpus_bleu` does. 0 to 100.
- `chrf_stats` / `chrf_score`: sacreBLEU's chrF (character 6-grams without whitespace,
  beta 2) and chrF++ (word bigrams too); with several references, each example keeps the
  statistics of its best-scoring one. 0 to 100.

Each function takes one prediction and its reference(s); `tasks.score_generations` applies
them to a task's examples. Pure Python: the reference packages are only the tests'.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
import string
from collections.abc import Callable, Sequence

from llama_jax.errors import ConfigError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# --- exact match ----------------------------------------------------------------------


def exact_match(
    prediction: str,
    reference: str,
    *,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
    regexes_to_ignore: Sequence[str] = (),
) -> float:
    """1.0 if the two texts are equal after stripping surrounding whitespace, else 0.0.

    The options transform both texts first, in lm-evaluation-harness's order: remove every
    match of each regular expression, lower-case, delete ASCII punctuation, delete digits.
    """

    def normalize(text: str) -> str:
        for pattern in regexes_to_ignore:
            text = re.sub(pattern, "", text)
        if ignore_case:
            text = text.lower()
        if ignore_punctuation:
            text = text.translate(_DELETE_PUNCTUATION)
        if ignore_numbers:
            text = text.translate(_DELETE_DIGITS)
        return text.strip()

    return float(normalize(prediction) == normalize(reference))


_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)
_DELETE_DIGITS = str.maketrans("", "", string.digits)


# --- ROUGE ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Score:
    precision: float
    recall: float
    fmeasure: float


_ZERO = Score(0.0, 0.0, 0.0)
_OUTSIDE_WORDS = re.compile(r"[^a-z0-9]+")
_WORD = re.compile(r"^[a-z0-9]+$")


@functools.cache
def _porter_stem() -> Callable[[str], str]:
    try:
        from nltk.stem import porter
    except ImportError as e:
        raise ConfigError(
            "ROUGE with use_stemmer needs nltk's Porter stemmer (the one rouge-score uses); "
            "install it with `pip install nltk`"
        ) from e
    return functools.lru_cache(maxsize=1 << 16)(porter.PorterStemmer().stem)


def require_stemmer() -> None:
    """Raises ConfigError unless the Porter stemmer ROUGE's `use_stemmer` needs is installed."""
    _porter_stem()


def rouge_tokens(text: str, use_stemmer: bool = False) -> list[str]:
    """The words ROUGE compares: lower-cased, split at every character outside [a-z0-9]
    (non-ASCII letters included), words longer than three characters stemmed."""
    words = _OUTSIDE_WORDS.sub(" ", text.lower()).split()
    if use_stemmer:
        stem = _porter_stem()
        words = [stem(w) if len(w) > 3 else w for w in words]
        # A stem could in principle leave the word alphabet; such words are dropped.
        words = [w for w in words if _WORD.match(w)]
    return words


def _f1(precision: float, recall: float) -> Score:
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return Score(precision, recall, f)


def _ngram_overlap(pred: Sequence[str], ref: Sequence[str], n: int) -> Score:
    def grams(words):
        return collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    pred_grams, ref_grams = grams(pred), grams(ref)
    hits = sum(min(c, pred_grams[g]) for g, c in ref_grams.items())
    return _f1(hits / max(sum(pred_grams.values()), 1), hits / max(sum(ref_grams.values()), 1))


def _lcs_table(a: Sequence[str], b: Sequence[str]) -> list[list[int]]:
    """table[i][j]: length of the longest common subsequence of a[:i] and b[:j]."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        above, row = table[i - 1], table[i]
        for j, y in enumerate(b, 1):
            row[j] = above[j - 1] + 1 if x == y else max(above[j], row[j - 1])
    return table


def _lcs_positions(ref: Sequence[str], pred: Sequence[str]) -> list[int]:
    """Indices into ref of one longest common subsequence. Which one matters for
    ROUGE-Lsum's union, so ties go as in ROUGE-1.5.5 and rouge-score: walking back from the
    end, a step along pred is taken only when it keeps a strictly longer subsequence."""
    table = _lcs_table(ref, pred)
    i, j, picked = len(ref), len(pred), []
    while i > 0 and j > 0:
        if ref[i - 1] == pred[j - 1]:
            picked.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return picked[::-1]


def _lcs_score(pred: Sequence[str], ref: Sequence[str]) -> Score:
    if not pred or not ref:
        return _ZERO
    lcs = _lcs_table(ref, pred)[-1][-1]
    return _f1(lcs / len(pred), lcs / len(ref))


def _summary_lcs_score(pred_sents: list[list[str]], ref_sents: list[list[str]]) -> Score:
    """Summary-level LCS (ROUGE paper section 3.2), each word counted at most as often as it
    occurs on both sides (ROUGE-1.5.5's rule against double counting)."""
    pred_total, ref_total = sum(map(len, pred_sents)), sum(map(len, ref_sents))
    if not pred_total or not ref_total:
        return _ZERO
    pred_left = collections.Counter(w for s in pred_sents for w in s)
    ref_left = collections.Counter(w for s in ref_sents for w in s)
    hits = 0
    for ref in ref_sents:
        union = sorted(set().union(*(_lcs_positions(ref, pred) for pred in pred_sents)))
        for word in (ref[i] for i in union):
            if pred_left[word] > 0 and ref_left[word] > 0:
                hits += 1
                pred_left[word] -= 1
                ref_left[word] -= 1
    return _f1(hits / pred_total, hits / ref_total)


def rouge(
    prediction: str,
    reference: str,
    types: Sequence[str] = ROUGE_TYPES,
    *,
    use_stemmer: bool = False,
) -> dict[str, Score]:
    """{type: Score(precision, recall, fmeasure)} of the prediction against one reference,
    for each of `types` (see ROUGE_TYPES). ROUGE-Lsum reads one sentence per line."""
    unknown = [t for t in types if t not in ROUGE_TYPES]
    if unknown:
        raise ConfigError(f"ROUGE types {unknown} are unknown; expected some of {ROUGE_TYPES}")
    pred = rouge_tokens(prediction, use_stemmer)
    ref = rouge_tokens(reference, use_stemmer)
    out = {}
    for kind in types:
        if kind == "rougeL":
            out[kind] = _lcs_score(pred, ref)
        elif kind == "rougeLsum":
            # Lines are kept or dropped by their raw text, before tokenization.
            out[kind] = _summary_lcs_score(
                [rouge_tokens(s, use_stemmer) for s in prediction.split("\n") if s],
                [rouge_tokens(s, use_stemmer) for s in reference.split("\n") if s],
            )
        else:
            out[kind] = _ngram_overlap(pred, ref, int(kind[len("rouge") :]))
    return out


# --- BLEU -----------------------------------------------------------------------------

BLEU_ORDER = 4
# mteval-v13a splits off ASCII punctuation except the apostrophe, comma, hyphen and period,
# which get the number-aware rules after it.
_13A_SPLIT = "".join(c for c in " " + string.punctuation if c not in "',-.")
_13A_RULES = (
    (re.compile(f"([{re.escape(_13A_SPLIT)}])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)
_13A_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


@functools.lru_cache(maxsize=1 << 16)
def tokenize_13a(line: str) -> str:
    """sacreBLEU's default BLEU tokenization (mteval-v13a, as used by WMT): tokens joined by
    single spaces."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        for entity, char in _13A_ENTITIES:
            line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return " ".join(line.split())


def _word_ngrams(words: Sequence[str], max_order: int) -> collections.Counter:
    return collections.Counter(
        tuple(words[i : i + n]) for n in range(1, max_order + 1) for i in range(len(words) - n + 1)
    )


def bleu_stats(hypothesis: str, references: Sequence[str], *, lowercase: bool = False):
    """int[2 + 2 * 4] sufficient statistics of one example: hypothesis length, the closest
    reference length (the shorter one on a tie), then matched and total n-grams for n = 1..4,
    each n-gram's matches clipped at its largest count in any one reference."""

    def words(text: str) -> list[str]:
        text = text.lower() if lowercase else text
        return tokenize_13a(text.rstrip()).split()

    hyp = words(hypothesis)
    ref_words = [words(r) for r in references]
    ref_counts: collections.Counter = collections.Counter()
    for ref in ref_words:
        ref_counts |= _word_ngrams(ref, BLEU_ORDER)
    closest = min((abs(len(hyp) - len(r)), len(r)) for r in ref_words)[1]
    matched, total = [0] * BLEU_ORDER, [0] * BLEU_ORDER
    for gram, count in _word_ngrams(hyp, BLEU_ORDER).items():
        total[len(gram) - 1] += count
        matched[len(gram) - 1] += min(count, ref_counts[gram])
    return [len(hyp), closest, *matched, *total]


def bleu_score(stats: Sequence[int], *, effective_order: bool = False) -> float:
    """BLEU (0 to 100) from summed `bleu_stats`, with the "exp" smoothing of mteval (the
    k-th order with no match counts as 1 / (2^k * total)). `effective_order` (sacreBLEU's
    sentence_bleu) averages only the orders the hypothesis has n-grams of."""
    hyp_len, ref_len = stats[0], stats[1]
    matched, total = stats[2 : 2 + BLEU_ORDER], stats[2 + BLEU_ORDER :]
    if not any(matched):
        return 0.0
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    log_precisions, halvings = [], 1.0
    for m, t in zip(matched, total, strict=True):
        if t == 0:
            break
        if m == 0:
            halvings *= 2
            log_precisions.append(math.log(100.0 / (halvings * t)))
        else:
            log_precisions.append(math.log(100.0 * m / t))
    orders = len(log_precisions) if effective_order else BLEU_ORDER
    if len(log_precisions) < orders:
        # Orders without any n-gram have precision 0: the score is 0, as in sacreBLEU.
        return 0.0
    return brevity * math.exp(sum(log_precisions) / orders)


# --- chrF -----------------------------------------------------------------------------

CHRF_CHAR_ORDER = 6
CHRF_BETA = 2


def _chrf_words(text: str) -> list[str]:
    """Words for chrF++: whitespace-split, one punctuation mark split off the end of a
    word, or else off its start."""
    out = []
    for w in text.split():
        if len(w) > 1 and w[-1] in string.punctuation:
            out += [w[:-1], w[-1]]
        elif len(w) > 1 and w[0] in string.punctuation:
            out += [w[0], w[1:]]
        else:
            out.append(w)
    return out


def _chrf_grams(text: str, word_order: int) -> list[collections.Counter]:
    chars = "".join(text.split())
    grams = [
        collections.Counter(chars[i : i + n] for i in range(len(chars) - n + 1))
        for n in range(1, CHRF_CHAR_ORDER + 1)
    ]
    words = _chrf_words(text)
    grams += [
        collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        for n in range(1, word_order + 1)
    ]
    return grams


def chrf_score(stats: Sequence[int]) -> float:
    """chrF (0 to 100) from summed `chrf_stats`: the F-beta (beta 2) of the precision and
    recall averaged over the n-gram orders both sides have n-grams of."""
    precision = recall = 0.0
    orders = 0
    for i in range(0, len(stats), 3):
        n_hyp, n_ref, n_match = stats[i : i + 3]
        if n_hyp > 0 and n_ref > 0:
            precision += n_match / n_hyp
            recall += n_match / n_ref
            orders += 1
    if orders == 0:
        return 0.0
    precision, recall = precision / orders, recall / orders
    if precision + recall == 0:
        return 0.0
    b2 = CHRF_BETA**2
    # sacreBLEU's order of operations, so that scores agree to the last bit.
    score = (1 + b2) * precision * recall
    score /= b2 * precision + recall
    return 100 * score


def chrf_stats(
    hypothesis: str, references: Sequence[str], *, word_order: int = 0, lowercase: bool = False
) -> list[int]:
    """int[3 * (6 + word_order)]: (hypothesis, reference, matched) n-gram counts per order,
    characters 1..6 then words 1..word_order (2: chrF++), of the reference with the best
    sentence-level chrF (the first one on a tie). A hypothesis n-gram counts only where the
    reference has n-grams of that order."""
    if lowercase:
        hypothesis, references = hypothesis.lower(), [r.lower() for r in references]
    hyp = _chrf_grams(hypothesis, word_order)
    best, best_f = [], -1.0
    for reference in references:
        stats = []
        for h, r in zip(hyp, _chrf_grams(reference, word_order), strict=True):
            matched = sum(min(c, r[g]) for g, c in h.items() if g in r)
            stats += [sum(h.values()) if r else 0, sum(r.values()), matched]
        f = chrf_score(stats)
        if f > best_f:
            best, best_f = stats, f
    return best

"""Generation metrics equal to the reference implementations: ROUGE to Google's rouge-score,
BLEU and chrF to sacreBLEU, on generated text with punctuation, case, digits, non-ASCII
letters, HTML entities and line breaks; exact match's options; a task's scoring."""

import random
import sys

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

from llama_jax.errors import ConfigError, DataError
from llama_jax.evals import task_metrics, text_metrics

PIECES = [
    "the", "The", "THE", "cat", "cats", "running", "runs", "ran", "on", "mat", "a", "is",
    "Hello,", "world!", "hello", "3.14", "1,000", "2024-05-01", "x-ray", "don't", "café",
    "naïve", "Straße", "İstanbul", "日本語", "\u212a", "&amp;", "&quot;hi&quot;", "e.g.",
    "U.S.", "(note)", "[x]", "-", "...", "?", "generously", "generalization", "connected",
    "connection", "<skipped>", "end.", "ß", "ﬁne", "Ⅻ", "₂", "naïvely", "42", "7th",
]  # fmt: skip
GLUE = [" ", " ", " ", "", "\n", "  ", ". ", ", ", "\t", "-\n"]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) + rng.choice(GLUE) for _ in range(rng.randint(0, 14)))


@pytest.fixture(scope="module")
def pairs():
    """300 (prediction, reference) pairs; every fifth shares most of its words."""
    rng = random.Random(0)
    out = []
    for i in range(300):
        ref = _text(rng)
        if i % 5 == 0:
            words = ref.split(" ")
            pred = " ".join(w for w in words if rng.random() > 0.3)
        else:
            pred = _text(rng)
        out.append((pred, ref))
    return out


def test_the_examples_that_used_to_disagree():
    assert text_metrics.rouge("Hello, world!", "hello world")["rougeL"].fmeasure == 1.0
    got = text_metrics.rouge("The cat sat on the mat.", "the cat is on the mat")["rougeL"]
    assert got.fmeasure == pytest.approx(5 / 6)


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_equals_rouge_score(pairs, use_stemmer):
    scorer = rouge_scorer.RougeScorer(list(text_metrics.ROUGE_TYPES), use_stemmer=use_stemmer)
    nonzero = 0
    for pred, ref in pairs:
        want = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        got = text_metrics.rouge(pred, ref, use_stemmer=use_stemmer)
        for kind in text_metrics.ROUGE_TYPES:
            w, g = want[kind], got[kind]
            assert (g.precision, g.recall, g.fmeasure) == (w.precision, w.recall, w.fmeasure), (
                kind,
                pred,
                ref,
            )
        nonzero += want["rougeLsum"].fmeasure > 0
    assert nonzero > 100  # the comparison is not only of zeros


def test_rouge_with_several_references_takes_the_best_as_score_multi(pairs):
    scorer = rouge_scorer.RougeScorer(list(text_metrics.ROUGE_TYPES))
    preds = [p for p, _ in pairs[:100]]
    refs = [[r, r2] for (_, r), (_, r2) in zip(pairs[:100], pairs[100:200], strict=True)]
    metrics = [task_metrics.parse_metric(k, "test") for k in text_metrics.ROUGE_TYPES]
    summary, rows = task_metrics.score_generations(metrics, preds, refs)
    for kind in text_metrics.ROUGE_TYPES:
        want = [scorer.score_multi(r, p)[kind].fmeasure for p, r in zip(preds, refs, strict=True)]
        assert [row[kind] for row in rows] == want
        assert summary[kind] == pytest.approx(sum(want) / len(want), rel=1e-12)


def test_13a_tokenization_equals_sacrebleu(pairs):
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    reference = Tokenizer13a()
    for text in [t for pair in pairs for t in pair]:
        assert text_metrics.tokenize_13a(text) == reference(text), text


@pytest.mark.parametrize("lowercase", [False, True])
def test_bleu_equals_sacrebleu(pairs, lowercase):
    preds = [p for p, _ in pairs]
    # One to three references per example; sacreBLEU takes reference streams padded by None.
    refs = [
        [r] + [pairs[(i * 7 + k) % len(pairs)][1] for k in range(i % 3)]
        for i, (_, r) in enumerate(pairs)
    ]
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(3)]
    want = BLEU(lowercase=lowercase).corpus_score(preds, streams).score
    stats = [
        text_metrics.bleu_stats(p, r, lowercase=lowercase) for p, r in zip(preds, refs, strict=True)
    ]
    got = text_metrics.bleu_score([sum(column) for column in zip(*stats, strict=True)])
    assert got == want and 0 < got < 100
    for (p, r), s in zip(zip(preds, refs, strict=True), stats, strict=True):
        sentence = sacrebleu.sentence_bleu(p, r, lowercase=lowercase).score
        assert text_metrics.bleu_score(s, effective_order=True) == sentence, (p, r)
    # The same through a task's metrics.
    metric = task_metrics.parse_metric({"metric": "bleu", "lowercase": lowercase}, "test")
    summary, _ = task_metrics.score_generations([metric], preds, refs)
    assert summary["bleu"] == want and summary["bleu_stderr"] > 0


@pytest.mark.parametrize("word_order", [0, 2])
def test_chrf_equals_sacrebleu(pairs, word_order):
    preds = [p for p, _ in pairs]
    refs = [[r, pairs[(i * 11) % len(pairs)][1]] for i, (_, r) in enumerate(pairs)]
    streams = [[rs[k] for rs in refs] for k in range(2)]
    want = CHRF(word_order=word_order).corpus_score(preds, streams).score
    name = "chrf++" if word_order else "chrf"
    summary, rows = task_metrics.score_generations(
        [task_metrics.parse_metric(name, "test")], preds, refs
    )
    assert summary[name] == want and 0 < want < 100
    for (p, r), row in zip(zip(preds, refs, strict=True), rows, strict=True):
        assert row[name] == CHRF(word_order=word_order).sentence_score(p, r).score, (p, r)
    lower = CHRF(lowercase=True).corpus_score(preds, streams).score
    stats = [
        text_metrics.chrf_stats(p, r, lowercase=True) for p, r in zip(preds, refs, strict=True)
    ]
    assert text_metrics.chrf_score([sum(c) for c in zip(*stats, strict=True)]) == lower


def test_bootstrap_stderr_is_seeded_and_shrinks_with_more_examples(pairs):
    preds, refs = [p for p, _ in pairs], [[r] for _, r in pairs]
    metric = [task_metrics.parse_metric("chrf", "test")]
    a, _ = task_metrics.score_generations(metric, preds[:50], refs[:50], seed=1)
    b, _ = task_metrics.score_generations(metric, preds[:50], refs[:50], seed=1)
    c, _ = task_metrics.score_generations(metric, preds, refs, seed=1)
    assert a == b and c["chrf_stderr"] < a["chrf_stderr"]
    one, _ = task_metrics.score_generations(metric, preds[:1], refs[:1])
    assert one["chrf_stderr"] is None


def test_exact_match_options():
    em = text_metrics.exact_match
    assert em(" 42\n", "42") == 1.0 and em("42.", "42") == 0.0
    assert em("Paris!", "paris") == 0.0
    assert em("Paris!", "paris", ignore_case=True, ignore_punctuation=True) == 1.0
    assert em("Paris!", "paris", ignore_case=True) == 0.0
    assert em("Paris", "paris", ignore_punctuation=True) == 0.0
    assert em("room 101", "room", ignore_numbers=True) == 1.0
    assert em("The answer is 7", "7", regexes_to_ignore=[r"^The answer is "]) == 1.0
    metric = task_metrics.parse_metric(
        {"metric": "exact_match", "ignore_case": True, "ignore_punctuation": True}, "t"
    )
    summary, rows = task_metrics.score_generations(
        [metric], ["Paris!", "Rome", "berlin."], [["paris"], ["Madrid", "rome"], ["Bonn"]]
    )
    assert [r["exact_match"] for r in rows] == [1.0, 1.0, 0.0]
    assert summary["exact_match"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "entry,message",
    [
        ("rouge", r"metric 'rouge' is unknown"),
        ({"metric": "bleu", "use_stemmer": True}, r"bleu has no option 'use_stemmer'"),
        ({"metric": "exact_match", "ignore_case": "yes"}, r"ignore_case='yes'; expected bool"),
        ({"metric": "exact_match", "regexes_to_ignore": ["("]}, r"'\(' is not a regular"),
        ({"name": "bleu"}, r"expected a metric name or"),
    ],
)
def test_bad_metric_entries_are_named(entry, message):
    with pytest.raises(DataError, match=message):
        task_metrics.parse_metric(entry, "t.jsonl:1")


def test_stemming_without_nltk_is_a_clear_error(monkeypatch):
    text_metrics._porter_stem.cache_clear()
    # A None entry makes `import nltk` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.stem", None)
    try:
        with pytest.raises(ConfigError, match="pip install nltk"):
            text_metrics.rouge("running", "runs", use_stemmer=True)
        with pytest.raises(DataError, match="t.jsonl:1: .*nltk"):
            task_metrics.parse_metric({"metric": "rougeL", "use_stemmer": True}, "t.jsonl:1")
        # Without stemming nltk is never needed.
        assert text_metrics.rouge("running", "running")["rouge1"].fmeasure == 1.0
    finally:
        text_metrics._porter_stem.cache_clear()

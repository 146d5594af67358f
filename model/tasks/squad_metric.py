"""SQuAD exact match and F1, as the official evaluation scripts compute them (v1.1, with v2.0's rule for
unanswerable questions). Re-implemented because the hub-hosted metric scripts cannot load offline."""

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, and collapse whitespace (in that order, as the
    official script does: "The  Cat!" -> "cat")."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Harmonic mean of precision and recall of the normalized tokens the two share (as multisets).

    When either side has no token left, v2.0's rule: 1 if both are empty, else 0 (v1.1 never meets an empty
    gold answer, and agrees everywhere else)."""
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    if not predicted or not gold:
        return float(predicted == gold)
    shared = sum((Counter(predicted) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(metric: Callable[[str, str], float], prediction: str,
                                  ground_truths: Sequence[str]) -> float:
    """A question with several gold answers scores its best match."""
    return max(metric(prediction, truth) for truth in ground_truths)


def squad_scores(predictions: Mapping, references: Mapping) -> dict[str, float]:
    """{"exact_match", "f1"} in 0-100, averaged over the questions in `references` (id -> gold answer texts).

    A question missing from `predictions` scores 0, as in the official script. An empty gold list marks an
    unanswerable question (SQuAD 2.0): only the empty answer is right, as the v2.0 script's gold [""]."""
    exact = f1 = 0.0
    for question_id, golds in references.items():
        if question_id not in predictions:
            continue
        truths = list(golds) or [""]
        prediction = predictions[question_id]
        exact += metric_max_over_ground_truths(exact_match_score, prediction, truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, truths)
    total = max(len(references), 1)
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}

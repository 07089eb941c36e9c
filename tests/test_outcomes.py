"""Prose that cannot drift from output: every outcome sentence of every chapter is computed or guarded.

An *outcome sentence* states what a run did. The scanner finds them in each chapter's markdown
(solutions included) by their vocabulary, after setting aside what is not a claim about a run:
headings, mathematics (``$...$``, ``$$...$$``, and every ``{prf:...}`` block: theorems,
proofs, definitions, algorithms, remarks), exercise prompts, code and directive options.
The vocabulary (CONTRIBUTING.md repeats it):

* comparisons: beats, outperforms, wins, faster, slower, fewer, better, worse, ahead of,
  superior, inferior, overtakes, exceeds, "more/less/lower/higher/smaller/larger/... than", "below/above"
  a value;
* outcomes: converges, diverges, reaches, escapes, stalls, stuck, fails, succeeds, matches,
  agrees, coincides, restores, stays;
* numbers about runs: a number followed by %, x, products, iterations, steps, backprops,
  epochs, seconds, rejections, evaluations, runs or times.

A sentence passes when

1. its outcome is *computed*: after removing its glued values (``{glue:text}``, ``{glue:md}``,
   ``{glue}``) no outcome word or run number is left (a glued number is fine, but a typed
   "beats" next to two glued numbers is not); or
2. it is *guarded*: it ends with ``<!-- check: name -->`` and the code right before or right
   after its markdown cell (the run of consecutive code cells there) calls
   ``course.check("name", ...)``, which fails the build when the outcome no longer holds; or
3. it speaks about mathematics or the literature, not this page's runs: it cites
   (``{cite}``, ``{prf:ref}``, "Theorem 1", "the paper", "the authors") and has no glued
   value and no word pointing at this page's runs ("we", "our", "here", "this run", "the
   figure", "measured", ...).

Chapters whose authors have not yet done this are listed in :data:`PENDING`; their test is a
strict expected failure, so it turns red as soon as a chapter passes and must leave the list.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))

#: Chapters still to be made to pass, with who must do it. Empty this list; never add to it.
PENDING = {
}

# ----------------------------------------------------------------------------- vocabulary
_WORDS = (r"beat(?:s|en|ing)?|outperform\w*|wins?|winning|won|faster|slower|quicker|fewer|better|worse|ahead of|"
          r"superior|inferior|overtak\w+|exceed\w*|surpass\w*|converg\w+|diverg\w+|reach(?:es|ed|ing)?|"
          r"escap\w+|stall\w*|stuck|fail(?:s|ed|ing|ure)?|succeed\w*|match(?:es|ed)?|agree(?:s|d|ing)?|"
          r"coincid\w+|restor\w+|stay(?:s|ed|ing)?")
OUTCOME_WORD = re.compile(rf"\b(?:{_WORDS})\b", re.IGNORECASE)
COMPARISON = re.compile(r"\b(?:more|less|lower|higher|smaller|larger|greater|longer|shorter|cheaper|costlier)\b"
                        r"[^.;]*?\bthan\b", re.IGNORECASE)
THRESHOLD = re.compile(r"\b(?:below|above)\s+(?:VALUE|MATH|\d)", re.IGNORECASE)
RUN_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:\s*[-–]\s*\d+(?:\.\d+)?)?\s*(?:%|×(?!\s*\d)|x\b|percent\b|"
                        r"(?:Hessian-vector )?products?\b|iterations?\b|steps?\b|backprops?\b|backpropagations?\b|"
                        r"epochs?\b|seconds?\b|rejections?\b|evaluations?\b|runs?\b|times\b)", re.IGNORECASE)
ATTRIBUTION = re.compile(r"\bCITE\b|\bPRFREF\b|\bthe paper\b|\bthe authors\b|"
                         r"\b(?:theorem|lemma|proposition|corollary|assumption|definition|algorithm)\s+\d", re.IGNORECASE)
DEIXIS = re.compile(r"\b(?:we|our|us|here|this page|this chapter|this run|the runs?|these runs|the output|printed|"
                    r"measured|the figure|the table|the picture|the plot|the panel)\b", re.IGNORECASE)

MARKER = re.compile(r"<!--\s*check:\s*([^>]*?)\s*-->")
_ABBREVIATIONS = ("e.g.", "i.e.", "cf.", "vs.", "Fig.", "Figs.", "Eq.", "Eqs.", "Prop.", "Alg.", "Sec.", "al.",
                  "Thm.", "Def.", "resp.", "approx.", "ch.", "Ch.", "No.")


def outcome_terms(sentence: str):
    """The outcome words and run numbers of a cleaned sentence (glued values already removed)."""
    terms = [m.group(0) for pat in (OUTCOME_WORD, COMPARISON, THRESHOLD, RUN_NUMBER) for m in pat.finditer(sentence)]
    return terms


# ----------------------------------------------------------------------------- markdown -> sentences
_FENCE = re.compile(r"^(\s*)(`{3,}|:{3,})\s*(\{[^}]*\})?.*$")
_SKIPPED = re.compile(r"^\{(?:prf:[\w-]+|exercise|solution-start|solution-end|math|code-cell|code|glossary)\}$")


def _prose_lines(markdown: str):
    """The markdown's lines that hold prose: fenced code, math and prf/exercise blocks removed,
    directive option lines dropped, other directives' bodies kept."""
    out, stack = [], []  # stack of (fence, skipped)
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if m:
            fence = m.group(2)
            if stack and fence[0] == stack[-1][0][0] and len(fence) >= len(stack[-1][0]) and \
                    line.strip() == fence:
                stack.pop()
                out.append("")
                i += 1
                continue
            name = m.group(3)
            skipped = name is None or bool(_SKIPPED.match(name)) or bool(stack and stack[-1][1])
            stack.append((fence, skipped))
            out.append("")
            i += 1
            continue
        if stack and stack[-1][1]:
            i += 1
            continue
        if stack and re.match(r"^\s*:[\w-]+:", line):  # a directive's option
            i += 1
            continue
        out.append(line)
        i += 1
    return out


def _clean(text: str) -> str:
    text = re.sub(r"\$\$.*?\$\$", " MATH ", text, flags=re.S)
    text = re.sub(r"(?<!\\)\$[^$]+?(?<!\\)\$", "MATH", text)
    text = re.sub(r"\{glue(?::\w+)?\}`[^`]*`", "VALUE", text)
    text = re.sub(r"\{cite(?::\w+)?\}`[^`]*`", "CITE", text)
    text = re.sub(r"\{prf:ref\}`[^`]*`", "PRFREF", text)
    text = re.sub(r"\{\w+(?::\w+)?\}`[^`]*`", "REF", text)
    text = re.sub(r"`[^`]*`", "CODE", text)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<(?!!--)[^>]+>", " ", text)  # other inline HTML
    return re.sub(r"[ \t]+", " ", text)


def _split_sentences(paragraph: str):
    protected = paragraph
    for abbr in _ABBREVIATIONS:
        protected = re.sub(r"(?<![A-Za-z])" + re.escape(abbr), abbr.replace(".", "\u2024"), protected)
    parts = re.split(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z(*_\"']|VALUE|MATH|<!--)", protected)
    return [p.replace("\u2024", ".") for p in parts if p.strip()]


def sentences(markdown: str):
    """``(sentence, guard names)`` for each prose sentence of a markdown cell. A marker
    ``<!-- check: a, b -->`` guards the sentence it follows."""
    lines = _prose_lines(markdown)
    paragraphs, current = [], []
    for line in lines:
        stripped = line.strip()
        starts_item = bool(re.match(r"^([-*+]|\d+\.)\s+", stripped)) or stripped.startswith("|")
        if not stripped or stripped.startswith("#") or starts_item:
            if current:
                paragraphs.append(" ".join(current))
            current = []
            if stripped and not stripped.startswith("#"):
                current = [re.sub(r"^([-*+]|\d+\.)\s+", "", stripped)]
                if stripped.startswith("|"):  # a table row is a unit of its own
                    paragraphs.append(current[0].replace("|", " ; "))
                    current = []
            continue
        current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    result = []
    for paragraph in paragraphs:
        if re.fullmatch(r"[\s|:;-]*", paragraph):
            continue
        cleaned = _clean(paragraph)
        for part in _split_sentences(cleaned):
            guards = [name.strip() for names in MARKER.findall(part) for name in names.split(",") if name.strip()]
            leading = re.match(r"^(\s*<!--\s*check:[^>]*-->\s*)+", part)
            if leading and result:  # a marker right after a sentence's full stop belongs to it
                lead_names = [n.strip() for names in MARKER.findall(leading.group(0)) for n in names.split(",")]
                result[-1][1].extend(n for n in lead_names if n)
                guards = [g for g in guards if g not in lead_names]
            elif leading:
                raise AssertionError(f"a check marker guards no sentence: {part.strip()[:80]!r}")
            text = MARKER.sub(" ", part).strip()
            if text:
                result.append((text, guards))
    return result


# ----------------------------------------------------------------------------- checks in code
def check_names(code: str):
    """Names of the ``course.check(name, ...)`` / ``check(name, ...)`` calls in a code cell."""
    lines = [re.sub(r"^(\s*)[%!].*", r"\1pass", line) for line in code.splitlines()]
    names = set()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called == "check" and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def unguarded_outcomes(cells):
    """Problems of a chapter: ``(cell index, sentence, reason)`` for every outcome sentence
    that is neither computed nor guarded, and every marker without its check."""
    problems = []
    code_checks = {i: check_names("".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "code"}

    def run_of_code(k, step):
        # the consecutive code cells from k on, walking by step: one block of code between two texts
        found = set()
        while 0 <= k < len(cells) and k in code_checks:
            found |= code_checks[k]
            k += step
        return found

    for i, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        for line in _prose_lines("".join(cell["source"])):
            if re.match(r"^\s*<!--", line):
                problems.append((i, line.strip(), "a check marker begins a line: Markdown then reads the rest of the "
                                                  "line as raw HTML; put the marker at the end of its sentence's line"))
        before = max((k for k in code_checks if k < i), default=None)
        after = min((k for k in code_checks if k > i), default=None)
        adjacent = (run_of_code(before, -1) if before is not None else set()) | \
                   (run_of_code(after, 1) if after is not None else set())
        for text, guards in sentences("".join(cell["source"])):
            for name in guards:
                if name not in adjacent:
                    problems.append((i, text, f"marker 'check: {name}' has no course.check({name!r}, ...) in the "
                                              "code cell right before or after this cell"))
            terms = outcome_terms(text.replace("VALUE", " "))
            if not terms or guards:
                continue
            if ATTRIBUTION.search(text) and "VALUE" not in text and not DEIXIS.search(text):
                continue
            problems.append((i, text, f"outcome sentence neither computed nor guarded (found: {', '.join(terms)})"))
    return problems


def _cells(nb: Path):
    return json.loads(nb.read_text())["cells"]


# ----------------------------------------------------------------------------- the chapters
@pytest.mark.parametrize("nb", [pytest.param(nb, marks=pytest.mark.xfail(
    strict=True, reason=f"pending: {PENDING[nb.name]} must compute or guard its outcome sentences"))
    if nb.name in PENDING else nb for nb in NOTEBOOKS], ids=lambda p: p.name)
def test_every_outcome_sentence_is_computed_or_guarded(nb):
    problems = unguarded_outcomes(_cells(nb))
    report = "\n".join(f"  cell {i}: {reason}\n    {text[:300]}" for i, text, reason in problems)
    assert not problems, f"{nb.name}: {len(problems)} outcome sentence(s) that the output could contradict:\n{report}"


def test_pending_lists_only_existing_chapters():
    names = {nb.name for nb in NOTEBOOKS}
    assert set(PENDING) <= names, f"PENDING names chapters that do not exist: {sorted(set(PENDING) - names)}"


# ----------------------------------------------------------------------------- the scanner itself
def _md(text):
    return {"cell_type": "markdown", "source": text}


def _code(text):
    return {"cell_type": "code", "source": text}


def _reasons(cells):
    return [reason for _, _, reason in unguarded_outcomes(cells)]


def test_an_unguarded_comparison_is_found():
    assert _reasons([_md("The ellipsoid beats the sphere.")])
    assert _reasons([_md("Adagrad needs fewer iterations.")])
    assert _reasons([_md("The loss is lower than the baseline's.")])
    assert _reasons([_md("- GLTR passes 99% after 4-5 products.")])
    assert _reasons([_md("The loss ends only slightly below $V$.")])


def test_glued_numbers_are_computed_but_a_typed_verdict_is_not():
    assert not _reasons([_md("GLTR needs {glue:text}`ch_k` products and CG {glue:text}`ch_c:.0f`.")])
    assert _reasons([_md("GLTR ({glue:text}`a`) beats CG ({glue:text}`b`).")])
    assert not _reasons([_md("GLTR needs {glue:md}`ch_fewer_or_more` products than CG.")])  # a computed verdict
    assert not _reasons([_md("So {glue:md}`ch_verdict`.")])


def test_a_marker_guards_its_sentence_when_the_adjacent_cell_checks_it():
    text = "The ellipsoid beats the sphere. <!-- check: ch_beats -->\nThe end."
    assert not _reasons([_code('course.check("ch_beats", a < b, "the ellipsoid beats the sphere")'), _md(text)])
    assert not _reasons([_md(text), _code('check("ch_beats", a < b, "...")')])
    assert not _reasons([_md("The ellipsoid beats the sphere <!-- check: ch_beats -->.\n"),
                         _code('course.check("ch_beats", True, "x")')])


def test_a_marker_without_its_check_or_far_from_it_fails():
    text = "The ellipsoid beats the sphere. <!-- check: ch_beats -->"
    assert _reasons([_md(text)])
    assert _reasons([_code('course.check("other", True, "x")'), _md(text)])
    far = [_code('course.check("ch_beats", True, "x")'), _md("Text."), _code("pass"), _md(text)]
    assert _reasons(far)
    block = [_code('course.check("ch_beats", True, "x")'), _code("plot()"), _md(text)]
    assert not _reasons(block)  # one block of code cells before the text
    assert _reasons([_code('course.check(f"ch_{k}", True, "x")'), _md(text.replace("ch_beats", "ch_k"))])


def test_a_marker_must_not_begin_a_line():
    cells = [_code('course.check("ch_a", True, "x")'), _md("The first run converges.\n<!-- check: ch_a --> Then {glue:text}`v`.")]
    assert any("begins a line" in r for r in _reasons(cells))
    cells[1] = _md("The first run converges. <!-- check: ch_a -->\nThen {glue:text}`v`.")
    assert not _reasons(cells)


def test_a_marker_guards_only_the_sentence_it_follows():
    cells = [_code('course.check("ch_a", True, "x")'),
             _md("The first run converges. <!-- check: ch_a --> The second run diverges.")]
    (problem,) = unguarded_outcomes(cells)
    assert "second run diverges" in problem[1]


def test_mathematics_prompts_and_headings_are_not_outcomes():
    proof = "```{prf:proof}\nThe iteration converges faster than any other.\n```\n"
    prompt = "```{exercise} Title\n:label: ch-ex1\nShow that it beats the sphere in 30 iterations.\n```\n"
    assert not _reasons([_md(proof), _md(prompt), _md("## Why Adam beats SGD\n")])
    nested = "````{prf:remark} R\n```python\nx = 1\n```\nIt converges.\n````\n"
    assert not _reasons([_md(nested)])


def test_solutions_and_admonitions_are_scanned():
    solution = "```{solution-start} ch-ex1\n:class: dropdown\n```\n"
    assert _reasons([_md(solution), _code("x = 1"), _md("The sphere stalls at the saddle.\n\n```{solution-end}\n```")])
    assert _reasons([_md("```{note}\nThe run converges in 12 iterations.\n```")])


def test_statements_about_the_literature_pass_unless_they_point_at_this_page():
    assert not _reasons([_md("The paper reports that the ellipsoid beats the sphere.")])
    assert not _reasons([_md("By Theorem 1 the method converges {cite}`kohler2019adaptive`.")])
    assert _reasons([_md("As the paper reports, the ellipsoid beats the sphere here.")])
    assert _reasons([_md("The paper's ellipsoid beats the sphere in {glue:text}`n` runs.")])
    assert _reasons([_md("As in the paper, our ellipsoid converges faster.")])


def test_sentences_are_split_on_full_stops_not_abbreviations():
    parts = [s for s, _ in sentences("The cost, e.g. a product, is one backprop. It stalls.")]
    assert parts == ["The cost, e.g. a product, is one backprop.", "It stalls."]
    assert "GD ; 12 iterations" in sentences("| method | iterations |\n|---|---|\n| GD | 12 iterations |")[-1][0]


def test_check_names_reads_course_check_calls():
    code = 'import x\ncourse.check("a_b", x < 1, "s")\ncheck("c", True, "t")\nother("d", 1)\n%matplotlib inline\n'
    assert check_names(code) == {"a_b", "c"}

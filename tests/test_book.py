"""The book's frame: every chapter in the toc exists, notebooks are committed clean,
the repository URL agrees everywhere, and every chapter keeps the course conventions."""

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

import trlib
from trlib import course

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def _toc_files():
    files = [TOC["root"]]
    for part in TOC.get("parts", []):
        files += [c["file"] for c in part["chapters"]]
    return files


NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))


def test_every_toc_entry_exists_and_every_notebook_is_listed():
    listed = set(_toc_files())
    for f in listed:
        assert (ROOT / f).with_suffix(".ipynb").exists() or (ROOT / f).with_suffix(".md").exists(), f
    for nb in NOTEBOOKS:
        assert str(nb.relative_to(ROOT).with_suffix("")) in listed, f"{nb.name} is not in _toc.yml"


def test_repository_url_agrees_everywhere():
    url = CONFIG["repository"]["url"]
    assert url == course.REPOSITORY_URL
    assert CONFIG["repository"]["branch"] == "main"
    readme = (ROOT / "README.md").read_text()
    assert url in readme
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text())["cells"]
        install = "".join(cells[1]["source"])
        assert cells[1]["cell_type"] == "code" and "google.colab" in install, f"{nb.name}: no install cell"
        urls = re.findall(r"git\+(https://[^\s@\"']+)", install)
        assert urls == [url], f"{nb.name}: install cell installs {urls}, _config.yml says {url}"
        assert course.INSTALL_SPEC in install


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_conventions(nb):
    data = json.loads(nb.read_text())
    cells = data["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "outputs committed"
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# ")
    assert "course.mode()" in "".join(cells[2]["source"]) and "banner" in "".join(cells[2]["source"])
    text = "\n".join("".join(c["source"]) for c in cells)
    exercises = re.findall(r"```\{exercise\}", text)
    solutions = re.findall(r"```\{solution(?:-start)?\}", text)
    assert len(exercises) >= 3, "at least three exercises per chapter"
    assert len(solutions) >= len(exercises), "every exercise has a solution"
    assert text.count("{solution-start}") == text.count("{solution-end}")
    assert ":class: dropdown" in text, "solutions are folded"
    assert data["metadata"].get("kernelspec", {}).get("name") == "python3"


# What a chapter may import on Colab or in a plain Jupyter: the standard library, trlib with its
# [data,plot] extras (import names of the distributions in pyproject.toml), and IPython.
INSTALLED_WITH_EXTRAS = {"torch", "numpy", "scipy", "tqdm", "torchvision", "sklearn", "mnist1d", "matplotlib",
                         "trlib", "IPython"}


def _imported_modules(code):
    # IPython magics (%pip, %matplotlib, !cmd) become `pass` at their indentation
    lines = [re.sub(r"^(\s*)[%!].*", r"\1pass", line) for line in code.splitlines()]
    tree = ast.parse("\n".join(lines))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_imports_only_what_the_install_cell_installs(nb):
    cells = json.loads(nb.read_text())["cells"]
    setup = "".join(cells[2]["source"])
    assert "from trlib.course import glue" in setup, "glue must come from trlib.course (myst-nb is not on Colab)"
    assert "medium=" in setup and "banner(" in setup, "the setup cell states the chapter's medium preset"
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        for module in _imported_modules("".join(cell["source"])):
            assert module in INSTALLED_WITH_EXTRAS or module in sys.stdlib_module_names, (
                f"{nb.name} imports {module!r}, which trlib-torch[data,plot] does not install: "
                "add it to the extras in pyproject.toml, or guard it in trlib.course")


def test_citations_exist_in_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    used = set()
    sources = [p.read_text() for p in NOTEBOOKS] + [(ROOT / "book" / "intro.md").read_text()]
    for text in sources:
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text):
            used.update(k.strip() for k in group.split(","))
    assert used <= keys, f"unknown citation keys: {sorted(used - keys)}"


def test_public_api_is_documented():
    for name in trlib.__all__:
        obj = getattr(trlib, name)
        assert getattr(obj, "__doc__", None), f"trlib.{name} has no docstring"

"""The book's frame: every chapter in the toc exists, notebooks are committed clean,
the repository URL agrees everywhere, and every chapter keeps the course conventions."""

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11: requirements.txt installs tomli
    import tomli as tomllib

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


def _sync_tool():
    spec = importlib.util.spec_from_file_location("sync_repository_url", ROOT / "tools" / "sync_repository_url.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _repository_setting(root=ROOT):
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def test_repository_url_agrees_everywhere():
    url = _repository_setting()
    owner, repo = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+)", url).groups()
    assert CONFIG["repository"]["url"] == url == course.REPOSITORY_URL
    assert CONFIG["repository"]["branch"] == "main"
    readme = (ROOT / "README.md").read_text()
    assert url in readme and f"https://colab.research.google.com/github/{owner}/{repo}/blob/main/book/" in readme
    assert f"https://{owner}.github.io/{repo}/" in readme
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text())["cells"]
        install = "".join(cells[1]["source"])
        assert cells[1]["cell_type"] == "code" and "google.colab" in install, f"{nb.name}: no install cell"
        urls = re.findall(r"git\+(https://[^\s@\"']+)", install)
        assert urls == [url], f"{nb.name}: install cell installs {urls}, pyproject.toml says {url}"
        assert course.INSTALL_SPEC in install
    assert _sync_tool().check(ROOT) == []


def test_the_repository_url_tool_rewrites_every_place(tmp_path):
    tool = _sync_tool()
    for name in tool.TEXT_FILES + tuple(str(nb.relative_to(ROOT)) for nb in NOTEBOOKS):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    old = _repository_setting()
    changed = tool.sync(tmp_path, "https://github.com/someone/fork-of-trlib")
    assert _repository_setting(tmp_path) == "https://github.com/someone/fork-of-trlib"
    assert set(changed) >= {"_config.yml", "trlib/course.py", "README.md", "pyproject.toml"}
    assert tool.check(tmp_path) == []
    for name in tool.TEXT_FILES + tuple(str(nb.relative_to(ROOT)) for nb in NOTEBOOKS):
        text = (tmp_path / name).read_text()
        assert old not in text, f"{name} still names {old}"
        if name.endswith(".ipynb"):
            cells = json.loads(text)["cells"]
            assert "git+https://github.com/someone/fork-of-trlib@main" in "".join(cells[1]["source"])
    readme = (tmp_path / "README.md").read_text()
    assert "https://colab.research.google.com/github/someone/fork-of-trlib/blob/main/book/" in readme
    assert "https://someone.github.io/fork-of-trlib/" in readme
    assert tool.sync(tmp_path) == []  # idempotent
    with pytest.raises(ValueError, match="github.com/OWNER/REPO"):
        tool.sync(tmp_path, "https://gitlab.com/someone/trlib")
    (tmp_path / "trlib" / "course.py").write_text((ROOT / "trlib" / "course.py").read_text())
    assert any("REPOSITORY_URL" in line for line in tool.check(tmp_path))


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


def _api_page_modules():
    """{module: options} of the automodule directives on the API page."""
    text = (ROOT / "book" / "api.md").read_text()
    found = {}
    for m in re.finditer(r"\.\. automodule:: (\S+)\n((?:   :[\w-]+:.*\n)*)", text):
        found[m.group(1)] = set(re.findall(r":([\w-]+):", m.group(2)))
    return found


def test_api_page_documents_every_public_module_and_name():
    assert "book/api" in _toc_files()
    documented = _api_page_modules()
    modules = [p.stem for p in (ROOT / "trlib").glob("*.py") if not p.stem.startswith("_")]
    modules += [f"experiments.{p.stem}" for p in (ROOT / "trlib" / "experiments").glob("*.py")
                if not p.stem.startswith("_")]
    for name in modules:
        assert "members" in documented.get(f"trlib.{name}", set()), f"trlib.{name} has no section on book/api.md"
    # the package's own names: a table of links into the modules, one row per name of trlib.__all__
    text = (ROOT / "book" / "api.md").read_text()
    table = re.search(r"\.\. autosummary::\n(?:   :[\w-]+:.*\n)*\n((?:   \S+\n)+)", text).group(1).split()
    names = [n for n in trlib.__all__ if not isinstance(getattr(trlib, n), type(trlib))]
    assert table == names, "book/api.md's table must list trlib.__all__ (modules aside), in its order"
    # the entry points the chapters and the README name
    from trlib.experiments import configs, results, runner
    public = set(runner.__all__) | set(results.__all__) | set(configs.__all__)
    assert {"run", "load_results", "summarize", "format_table", "get_config"} <= public


def test_book_build_is_nitpicky_with_deliberate_exceptions():
    sphinx = CONFIG["sphinx"]
    assert {"sphinx.ext.autodoc", "sphinx.ext.napoleon"} <= set(sphinx["extra_extensions"])
    patterns = [re.compile(p) for _, p in sphinx["config"]["nitpick_ignore_regex"]]
    for external in ("torch.Tensor", "numpy.ndarray", "os.PathLike", "torch.nn.modules.module.Module"):
        assert any(p.fullmatch(external) for p in patterns)
    for ours in ("trlib.TrustRegion", "trlib.norms.Norm", "Norm", "trlib.experiments.runner.Budget"):
        assert not any(p.fullmatch(ours) for p in patterns), f"{ours} must resolve, not be ignored"
    makefile = (ROOT / "Makefile").read_text()
    assert "-W -n" in makefile and "-W -n" in (ROOT / ".ci" / "run").read_text()


def test_notebook_tests_hide_myst_nb_from_the_kernel():
    recipe = re.search(r"\ntest-notebooks:.*?\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text()).group(1)
    assert "tests/without_myst_nb" in recipe and "--nbval" in recipe
    code = (
        "try:\n    import myst_nb\nexcept ImportError:\n    print('hidden')\n"
        "from trlib.course import glue, glued\nglue('answer', 42, display=False)\nprint(glued['answer'])\n")
    env = {"PYTHONPATH": f"{ROOT / 'tests' / 'without_myst_nb'}:{ROOT}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hidden", "42"]


def test_pages_workflow_builds_with_warnings_as_errors_and_deploys():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    assert workflow["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    assert workflow["concurrency"]["group"] == "pages"
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as True
    assert "push" in triggers and "workflow_dispatch" in triggers
    build, deploy = workflow["jobs"]["build"], workflow["jobs"]["deploy"]
    uses = [s.get("uses", "").split("@")[0] for s in build["steps"]]
    assert uses[:2] == ["actions/checkout", "actions/setup-python"]
    assert build["steps"][1]["with"]["cache"] == "pip"
    runs = "\n".join(s.get("run", "") for s in build["steps"])
    assert "dataset-fashion-mnist" in runs and "-r requirements.txt" in runs
    assert re.search(r"jupyter-book build .* -W -n", runs)
    upload = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    assert deploy["needs"] == "build" and deploy["environment"]["name"] == "github-pages"
    assert deploy["steps"][-1]["uses"].startswith("actions/deploy-pages")

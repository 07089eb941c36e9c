"""Rewrite every place that names the repository from its one setting, ``Repository`` under
``[project.urls]`` in pyproject.toml.

The places: pyproject.toml's other project URLs, _config.yml (``repository.url``: the book's repository button and its Colab launch
buttons), ``trlib.course.REPOSITORY_URL`` (what a notebook on Colab installs), the install cell
of every chapter, and the install commands and links of README.md, book/intro.md and
CONTRIBUTING.md (the repository, its Colab links, the GitHub Pages address of the book).

    python tools/sync_repository_url.py                 # rewrite every place from the setting
    python tools/sync_repository_url.py --set URL       # change the setting, then rewrite
    python tools/sync_repository_url.py --check         # list the places that disagree; exit 1 if any

``make repository-url URL=https://github.com/OWNER/REPO`` runs the second form. Only the
standard library is needed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTING = re.compile(r'(?m)^(Repository\s*=\s*")([^"]+)(")')
GITHUB = re.compile(r"^https://github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)$")
TEXT_FILES = ("pyproject.toml", "_config.yml", "trlib/course.py", "README.md", "book/intro.md", "CONTRIBUTING.md")


def parse(url: str):
    """(owner, repository) of a GitHub URL; ValueError otherwise (Colab opens notebooks from GitHub)."""
    m = GITHUB.match(url.rstrip("/"))
    if not m or m.group(2).endswith(".git"):
        raise ValueError(f"invalid repository URL {url!r}: expected https://github.com/OWNER/REPO "
                         "(Colab's launch links and GitHub Pages need a GitHub repository)")
    return m.group(1), m.group(2)


def forms(url: str) -> dict:
    """The strings derived from the repository URL, by what they are."""
    owner, repo = parse(url)
    return {"repository": f"https://github.com/{owner}/{repo}",
            "colab": f"https://colab.research.google.com/github/{owner}/{repo}",
            "pages": f"https://{owner}.github.io/{repo}/"}


def setting(root: Path = ROOT) -> str:
    m = SETTING.search((root / "pyproject.toml").read_text(encoding="utf-8"))
    if not m:
        raise ValueError("pyproject.toml has no [project.urls] Repository setting")
    return m.group(2)


def notebooks(root: Path):
    return sorted((root / "book").glob("*.ipynb"))


def current_urls(root: Path) -> set:
    """The repository URLs the places name now (normally one)."""
    found = set(re.findall(r"(?m)^  url: (\S+)", (root / "_config.yml").read_text(encoding="utf-8")))
    found |= set(re.findall(r'REPOSITORY_URL = "([^"]+)"', (root / "trlib/course.py").read_text(encoding="utf-8")))
    for nb in notebooks(root):
        found |= set(re.findall(r"git\+(https://github\.com/[^\s@\"'\\]+)", nb.read_text(encoding="utf-8")))
    return {u.rstrip("/") for u in found}


def _rewrite(text: str, old: str, new: str) -> str:
    a, b = forms(old), forms(new)
    for key in ("colab", "pages", "repository"):  # the longer forms first
        text = text.replace(a[key], b[key])
    return text


def sync(root: Path = ROOT, new_url: str = None) -> list:
    """Rewrite every place from the setting (after setting it to ``new_url``); return the files changed."""
    if new_url is not None:
        parse(new_url)
        path = root / "pyproject.toml"
        text = path.read_text(encoding="utf-8")
        if not SETTING.search(text):
            raise ValueError("pyproject.toml has no [project.urls] Repository setting")
        path.write_text(SETTING.sub(lambda m: m.group(1) + new_url.rstrip("/") + m.group(3), text), encoding="utf-8")
    url = setting(root)
    parse(url)
    changed = []
    olds = [u for u in current_urls(root) if u != url and GITHUB.match(u)]
    for path in [root / f for f in TEXT_FILES] + notebooks(root):
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        new = text
        for old in olds:
            new = _rewrite(new, old, url)
        if path.suffix == ".ipynb" and new != text:
            json.loads(new)  # still a valid notebook
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(str(path.relative_to(root)))
    return changed


def check(root: Path = ROOT) -> list:
    """The places that disagree with the setting, each as one line (empty: all agree)."""
    url = setting(root)
    f = forms(url)
    problems = [f"a place names {u}, but the setting is {url}" for u in sorted(current_urls(root) - {url})]
    if f"  url: {url}\n" not in (root / "_config.yml").read_text(encoding="utf-8"):
        problems.append(f"_config.yml: repository.url is not {url}")
    if f'REPOSITORY_URL = "{url}"' not in (root / "trlib/course.py").read_text(encoding="utf-8"):
        problems.append(f"trlib/course.py: REPOSITORY_URL is not {url}")
    for nb in notebooks(root):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        install = "".join(cells[1]["source"]) if len(cells) > 1 else ""
        if re.findall(r"git\+(https://[^\s@\"']+)", install) != [url]:
            problems.append(f"{nb.relative_to(root)}: the install cell does not install from {url}")
    readme = (root / "README.md").read_text(encoding="utf-8")
    for key in ("repository", "colab", "pages"):
        if f[key] not in readme:
            problems.append(f"README.md does not contain {f[key]}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", metavar="URL", help="change the setting to URL, then rewrite every place")
    parser.add_argument("--check", action="store_true", help="only list the places that disagree")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check()
            for line in problems:
                print(line)
            return 1 if problems else 0
        changed = sync(new_url=args.set)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"repository: {setting()}; rewrote {', '.join(changed) if changed else 'nothing (all places agree)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

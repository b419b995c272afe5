"""Helpers to write the book's chapters as output-stripped notebooks.

Every chapter starts with :data:`COLAB_CELL`, the standard set-up cell: in Colab it installs
the companion package from the book's repository, everywhere it picks the device and the
``QUICK`` configuration (the default on a CPU; a GPU, ``BOOK_FULL=1`` or ``QUICK = False`` gives
the full one, ``BOOK_QUICK=1`` forces QUICK). With the placeholder repository the cell stops in
Colab with a one-line instruction instead of failing to clone.

Usage from a throw-away generator script::

    from scripts.nbtools import write_chapter
    write_chapter("book/05_postprocessing.ipynb", [
        ("md", "# Post-processing\\n..."),
        ("code", "import companion ..."),
    ])
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

#: The placeholder repository of a fresh checkout. ``python scripts/nbtools.py --set-repo URL``
#: points ``_config.yml`` (the Colab launch button) and every chapter's set-up cell at ``URL``;
#: the GitHub Pages workflow runs it with the repository it builds.
REPO_URL = "https://github.com/your-org/probabilistic-instance-segmentation-book"

#: The line of the set-up cell that names the repository.
_REPO_LINE = re.compile(r'^REPO = "[^"\n]*"$', re.MULTILINE)

COLAB_CELL = f'''# Set-up: in Colab this clones the book's repository (the chapters read its results/ folder)
# and installs the `companion` package from it; locally (after the README's set-up) both are there.
import os
import subprocess
import sys

REPO = "{REPO_URL}"
if "google.colab" in sys.modules and "your-org" in REPO:
    sys.exit(
        "This copy of the book names no repository yet: set REPO above to the repository that "
        "holds it (e.g. https://github.com/OWNER/NAME) and run this cell again."
    )
if "google.colab" in sys.modules:
    CLONE = "/content/book-repo"
    if not os.path.isdir(CLONE):
        subprocess.run(["git", "clone", "--depth", "1", REPO, CLONE], check=True)
    # the package alone: Colab has torch, numpy, scipy, scikit-image, matplotlib, h5py, ipywidgets
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-e", CLONE], check=True
    )
    # the editable install, importable without restarting the runtime
    sys.path.insert(0, CLONE)

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# QUICK (minutes on a CPU) unless a GPU is there or BOOK_FULL=1; BOOK_QUICK=1 forces QUICK
QUICK = os.environ.get("BOOK_QUICK") == "1" or (
    DEVICE.type == "cpu" and os.environ.get("BOOK_FULL", "0") != "1"
)
print(f"device: {{DEVICE}}; configuration: {{'QUICK' if QUICK else 'FULL'}}")
if DEVICE.type == "cpu":
    print(
        "No GPU found: this chapter runs on the CPU in its QUICK configuration. "
        "In Colab, choose Runtime > Change runtime type > GPU for the full one."
    )'''


def setup_cell_source(url: str = REPO_URL) -> str:
    """:data:`COLAB_CELL` installing from the repository ``url``."""
    return _REPO_LINE.sub(f'REPO = "{url}"', COLAB_CELL)


def _cell(kind: str, source: str, tags: list[str] | None = None) -> dict:
    meta = {"tags": list(tags)} if tags else {}
    if kind == "md":
        return {"cell_type": "markdown", "metadata": meta, "source": source}
    if kind == "code":
        return {
            "cell_type": "code",
            "metadata": meta,
            "source": source,
            "execution_count": None,
            "outputs": [],
        }
    raise ValueError(f"cell kind must be 'md' or 'code', got {kind!r}")


def write_chapter(path: str | os.PathLike, cells: list[tuple], *, colab_cell: bool = True) -> Path:
    """Write an output-stripped notebook, the Colab set-up cell first.

    ``cells`` holds ``(kind, source)`` or ``(kind, source, tags)`` tuples, kind ``"md"`` or
    ``"code"``; tags such as ``["hide-input"]`` or ``["hide-cell"]`` are Jupyter Book's.
    A first markdown cell (the title) is kept before the set-up cell, which is tagged
    ``hide-cell`` (collapsed in the book with its printout, plain in Colab) and installs from
    ``_config.yml``'s repository.
    """
    body = [_cell(*c) for c in cells]
    if colab_cell:
        title = body[:1] if body and body[0]["cell_type"] == "markdown" else []
        setup = _cell("code", setup_cell_source(config_repository()), ["hide-cell"])
        body = title + [setup] + body[len(title) :]
    nb = {
        "cells": body,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    for i, cell in enumerate(nb["cells"]):
        cell["id"] = f"cell-{i:03d}"
    path = Path(path)
    _atomic_write_text(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return path


def strip_outputs(path: str | os.PathLike) -> None:
    """Remove outputs and execution counts from a notebook in place."""
    path = Path(path)
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    _atomic_write_text(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def _repository_url_line(lines: list[str]) -> int | None:
    """Index of the ``url:`` line inside the top-level ``repository:`` block of ``_config.yml``."""
    inside = False
    for i, line in enumerate(lines):
        if re.match(r"^repository:\s*(#.*)?$", line):
            inside = True
        elif inside and line.strip() and not line.startswith((" ", "\t", "#")):
            return None  # the block ended without a url
        elif inside and re.match(r"^\s+url:", line):
            return i
    return None


def config_repository(config: str | os.PathLike = "_config.yml") -> str:
    """``repository.url`` of ``config``; :data:`REPO_URL` when the file or the key is missing."""
    path = Path(config)
    if not path.is_file():
        return REPO_URL
    lines = path.read_text().splitlines()
    i = _repository_url_line(lines)
    if i is None:
        return REPO_URL
    return lines[i].split("url:", 1)[1].split(" #", 1)[0].strip().strip("\"'")


def set_repository(
    url: str, book_dir: str | os.PathLike = "book", config: str | os.PathLike | None = "_config.yml"
) -> int:
    """Point the book at the repository ``url``; returns the number of chapters changed.

    Rewrites ``repository.url`` in ``config`` (the Colab launch button's repository; ``None``
    leaves it) and the ``REPO = "..."`` line of every chapter's set-up cell (whatever URL it held
    before, so the rewrite can be repeated). Nothing else in either file changes.
    """
    if not re.fullmatch(r"https://[^\s\"'#]+", url):
        raise ValueError(f"--set-repo wants an https:// URL without spaces or quotes, got {url!r}")
    url = url.rstrip("/")
    if config is not None:
        path = Path(config)
        lines = path.read_text().splitlines(keepends=True)
        i = _repository_url_line([line.rstrip("\n") for line in lines])
        if i is None:
            raise ValueError(f"{path} has no repository: url: entry to rewrite")
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        lines[i] = f"{indent}url: {url}\n"
        _atomic_write_text(path, "".join(lines))
    changed = 0
    for nb_path in sorted(Path(book_dir).glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        first = next((c for c in nb["cells"] if c["cell_type"] == "code"), None)
        if first is None:
            continue
        source = "".join(first["source"])
        new = _REPO_LINE.sub(f'REPO = "{url}"', source)
        if new != source:
            first["source"] = new
            _atomic_write_text(nb_path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            changed += 1
    return changed


def refresh_setup_cells(
    book_dir: str | os.PathLike = "book", config: str | os.PathLike = "_config.yml"
) -> int:
    """Make every chapter's first code cell the current :data:`COLAB_CELL`, installing from
    ``config``'s repository; returns the number changed. Cell metadata (tags) is kept."""
    cell = setup_cell_source(config_repository(config))
    changed = 0
    for nb_path in sorted(Path(book_dir).glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        first = next(c for c in nb["cells"] if c["cell_type"] == "code")
        if "".join(first["source"]) != cell:
            first["source"] = cell
            _atomic_write_text(nb_path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            changed += 1
    return changed


def repository_problems(
    url: str, book_dir: str | os.PathLike = "book", config: str | os.PathLike = "_config.yml"
) -> list[str]:
    """Where the committed book names another repository than ``url`` (empty: all point at it)."""
    url = url.rstrip("/")
    found = [] if config_repository(config).rstrip("/") == url else [f"{config}: {config_repository(config)}"]
    for nb_path in sorted(Path(book_dir).glob("*.ipynb")):
        first = next((c for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code"), None)
        match = _REPO_LINE.search("".join(first["source"])) if first else None
        named = match.group(0).split('"')[1] if match else None
        if named is None or named.rstrip("/") != url:
            found.append(f"{nb_path.name}: {named}")
    return found


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
    os.replace(tmp, path)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strip", nargs="*", default=[], help="notebooks to strip of outputs")
    parser.add_argument(
        "--set-repo",
        metavar="URL",
        help="point _config.yml's repository.url and every chapter's set-up cell at URL",
    )
    parser.add_argument(
        "--check-repo",
        metavar="URL",
        help="exit 1 naming every file whose repository is not URL (the publish step runs it: "
        "the committed chapters are what Colab opens)",
    )
    parser.add_argument(
        "--root", default=".", help="the book's root: _config.yml and book/ (default: the current directory)"
    )
    parser.add_argument(
        "--refresh-setup", action="store_true", help="rewrite every chapter's set-up cell from COLAB_CELL"
    )
    args = parser.parse_args()
    for p in args.strip:
        strip_outputs(p)
    root = Path(args.root)
    if args.set_repo:
        try:
            n = set_repository(args.set_repo, root / "book", root / "_config.yml")
        except (OSError, ValueError) as err:
            sys.exit(f"nbtools: {err}")
        print(f"repository {args.set_repo.rstrip('/')}: _config.yml and {n} chapters updated")
    if args.check_repo:
        problems = repository_problems(args.check_repo, root / "book", root / "_config.yml")
        if problems:
            sys.exit(
                f"nbtools: the committed book does not point at {args.check_repo}; run "
                f"`python scripts/nbtools.py --set-repo {args.check_repo}` and commit ({len(problems)} "
                f"file(s): {'; '.join(problems[:3])})"
            )
        print(f"the book points at {args.check_repo}")
    if args.refresh_setup:
        print(
            f"refreshed the set-up cell of {refresh_setup_cells(root / 'book', root / '_config.yml')} chapters"
        )
    sys.exit(0)

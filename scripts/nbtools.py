"""Helpers to write the book's chapters as output-stripped notebooks.

Every chapter starts with :data:`COLAB_CELL`, the standard set-up cell: in Colab it installs
the companion package from the book's repository, everywhere it picks the device and the
``QUICK`` configuration (the default; ``BOOK_FULL=1`` or ``QUICK = False`` gives the full one).

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
import sys
import tempfile
from pathlib import Path

#: The book's repository. Forks: change it here, in ``_config.yml`` and run
#: ``python scripts/nbtools.py --set-repo URL`` to update every chapter.
REPO_URL = "https://github.com/your-org/probabilistic-instance-segmentation-book"

COLAB_CELL = f'''# Set-up: in Colab this clones the book's repository (the chapters read its results/ folder)
# and installs the `companion` package from it; locally (after the README's set-up) both are there.
import os
import subprocess
import sys

REPO = "{REPO_URL}"
if "google.colab" in sys.modules:
    CLONE = "/content/book-repo"
    if not os.path.isdir(CLONE):
        subprocess.run(["git", "clone", "--depth", "1", REPO, CLONE], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{{CLONE}}[book]"], check=True)
    sys.path.insert(0, CLONE)  # the editable install, importable without restarting the runtime

import torch

QUICK = os.environ.get("BOOK_FULL", "0") != "1"  # BOOK_FULL=1 (or QUICK = False here) runs the full configuration
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(f"device: {{DEVICE}}; configuration: {{'QUICK' if QUICK else 'FULL'}}")
if DEVICE.type == "cpu":
    print("No GPU found: this chapter runs on the CPU in its QUICK configuration. "
          "In Colab, choose Runtime > Change runtime type > GPU for the full one.")'''


def _cell(kind: str, source: str, tags: list[str] | None = None) -> dict:
    meta = {"tags": list(tags)} if tags else {}
    if kind == "md":
        return {"cell_type": "markdown", "metadata": meta, "source": source}
    if kind == "code":
        return {"cell_type": "code", "metadata": meta, "source": source,
                "execution_count": None, "outputs": []}
    raise ValueError(f"cell kind must be 'md' or 'code', got {kind!r}")


def write_chapter(path: str | os.PathLike, cells: list[tuple], *, colab_cell: bool = True) -> Path:
    """Write an output-stripped notebook, the Colab set-up cell first.

    ``cells`` holds ``(kind, source)`` or ``(kind, source, tags)`` tuples, kind ``"md"`` or
    ``"code"``; tags such as ``["hide-input"]`` or ``["hide-cell"]`` are Jupyter Book's.
    A first markdown cell (the title) is kept before the set-up cell.
    """
    body = [_cell(*c) for c in cells]
    if colab_cell:
        title = body[:1] if body and body[0]["cell_type"] == "markdown" else []
        body = title + [_cell("code", COLAB_CELL)] + body[len(title):]
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


def set_repository(url: str, book_dir: str | os.PathLike = "book") -> int:
    """Replace the repository URL in every chapter's set-up cell; returns the number changed."""
    changed = 0
    for nb_path in sorted(Path(book_dir).glob("*.ipynb")):
        text = nb_path.read_text()
        new = text.replace(REPO_URL, url)
        if new != text:
            _atomic_write_text(nb_path, new)
            changed += 1
    return changed


def refresh_setup_cells(book_dir: str | os.PathLike = "book") -> int:
    """Make every chapter's first code cell the current :data:`COLAB_CELL`; returns the number changed."""
    changed = 0
    for nb_path in sorted(Path(book_dir).glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        first = next(c for c in nb["cells"] if c["cell_type"] == "code")
        if "".join(first["source"]) != COLAB_CELL:
            first["source"] = COLAB_CELL
            _atomic_write_text(nb_path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            changed += 1
    return changed


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
    parser.add_argument("--set-repo", metavar="URL", help="point every chapter's set-up cell at URL")
    parser.add_argument("--refresh-setup", action="store_true",
                        help="rewrite every chapter's set-up cell from COLAB_CELL")
    args = parser.parse_args()
    for p in args.strip:
        strip_outputs(p)
    if args.set_repo:
        print(f"updated {set_repository(args.set_repo)} chapters")
    if args.refresh_setup:
        print(f"refreshed the set-up cell of {refresh_setup_cells()} chapters")
    sys.exit(0)

"""Structure of the book: every notebook is listed in _toc.yml, starts with the Colab set-up cell
and is stored without outputs; _config.yml carries what the Colab launch button needs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

BOOK = REPO_ROOT / "book"
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))


def _toc_files() -> set[str]:
    toc = yaml.safe_load((REPO_ROOT / "_toc.yml").read_text())
    files = {toc["root"]}
    stack = list(toc.get("parts", [])) + list(toc.get("chapters", []))
    while stack:
        entry = stack.pop()
        if "file" in entry:
            files.add(entry["file"])
        stack += entry.get("chapters", []) + entry.get("sections", [])
    return files


def test_every_notebook_is_in_the_toc_and_every_toc_entry_exists():
    listed = _toc_files()
    on_disk = {str(p.relative_to(REPO_ROOT).with_suffix("")) for p in NOTEBOOKS}
    assert on_disk <= listed, f"not in _toc.yml: {sorted(on_disk - listed)}"
    for entry in listed:
        candidates = [REPO_ROOT / f"{entry}{ext}" for ext in (".ipynb", ".md")]
        assert any(c.exists() for c in candidates), f"_toc.yml lists {entry}, which does not exist"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_opens_with_colab_setup_and_is_output_stripped(path: Path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cell"
    first = "".join(code[0]["source"])
    assert "google.colab" in first and "pip" in first and "install" in first, (
        f"{path.name}: the first code cell must be the Colab set-up cell (scripts/nbtools.COLAB_CELL)")
    assert "torch.cuda.is_available()" in first, f"{path.name}: the set-up cell must check for a GPU"
    assert "QUICK" in first
    dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs; store notebooks output-stripped"


def test_config_has_colab_launch_button_and_forced_execution():
    config = yaml.safe_load((REPO_ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "force"
    assert config["execute"]["timeout"] > 0
    assert config["launch_buttons"]["colab_url"].startswith("https://colab.research.google.com")
    repo = config["repository"]
    assert repo["url"].startswith("https://github.com/") and repo["branch"]
    assert "path_to_book" in repo


def test_colab_cells_point_at_the_configured_repository():
    url = yaml.safe_load((REPO_ROOT / "_config.yml").read_text())["repository"]["url"]
    for path in NOTEBOOKS:
        first = "".join(next(c for c in json.loads(path.read_text())["cells"]
                             if c["cell_type"] == "code")["source"])
        assert url in first, f"{path.name} installs from another repository than _config.yml's {url}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_chapters_that_plot_select_the_inline_backend(path: Path):
    """With MPLBACKEND=Agg in the environment, plt.show() in a kernel prints nothing: the
    rendered page would silently lose its figures unless the chapter asks for inline plots."""
    code = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    if any("matplotlib" in src for src in code):
        assert any("%matplotlib inline" in src for src in code), f"{path.name}: add %matplotlib inline"

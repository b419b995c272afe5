"""Structure of the book: every notebook is listed in _toc.yml, starts with the (hidden) Colab set-up
cell, ends with its key takeaways and is stored without outputs; _config.yml carries what the Colab
launch button needs, and `scripts/nbtools.py --set-repo` points both at a repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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
        f"{path.name}: the first code cell must be the Colab set-up cell (scripts/nbtools.COLAB_CELL)"
    )
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
        first = "".join(
            next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")["source"]
        )
        assert url in first, f"{path.name} installs from another repository than _config.yml's {url}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_chapters_that_plot_select_the_inline_backend(path: Path):
    """With MPLBACKEND=Agg in the environment, plt.show() in a kernel prints nothing: the
    rendered page would silently lose its figures unless the chapter asks for inline plots."""
    code = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    if any("matplotlib" in src for src in code):
        assert any("%matplotlib inline" in src for src in code), f"{path.name}: add %matplotlib inline"


_HIDING_TAGS = {"hide-input", "hide-cell", "remove-input"}
_NOT_RUN_TAGS = {"remove-cell", "skip-execution", "raises-exception"}


def _first_code_cell(path: Path) -> dict:
    return next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_setup_cell_is_hidden_but_still_runs(path: Path):
    tags = set(_first_code_cell(path).get("metadata", {}).get("tags", []))
    assert tags & _HIDING_TAGS, f"{path.name}: tag the set-up cell hide-input"
    assert not tags & _NOT_RUN_TAGS, f"{path.name}: the set-up cell must run ({sorted(tags & _NOT_RUN_TAGS)})"


def test_set_repo_rewrites_config_and_every_setup_cell(tmp_path: Path):
    """`nbtools.py --set-repo URL` (what the Pages workflow runs) on a copy of the book: the launch
    button's repository and every chapter's set-up cell change, nothing else does, and the
    rewrite can be repeated with another URL."""
    (tmp_path / "book").mkdir()
    (tmp_path / "_config.yml").write_text((REPO_ROOT / "_config.yml").read_text())
    for path in NOTEBOOKS:
        (tmp_path / "book" / path.name).write_text(path.read_text())
    originals = {p.name: p.read_bytes() for p in NOTEBOOKS} | {
        "_config.yml": (REPO_ROOT / "_config.yml").read_bytes()
    }
    config_before = yaml.safe_load((tmp_path / "_config.yml").read_text())
    old_url = config_before["repository"]["url"]

    for url in ("https://github.com/someone/fork-of-the-book", "https://github.com/other/book-two"):
        done = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "nbtools.py"), "--set-repo", url],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        config = yaml.safe_load((tmp_path / "_config.yml").read_text())
        assert config["repository"]["url"] == url
        config["repository"]["url"] = old_url
        assert config == config_before, "--set-repo changed more of _config.yml than repository.url"
        for path in NOTEBOOKS:
            copy = tmp_path / "book" / path.name
            source = "".join(_first_code_cell(copy)["source"])
            assert f'REPO = "{url}"' in source, f"{path.name}: set-up cell not rewritten"
            assert old_url not in copy.read_text()
            before, after = json.loads(path.read_text()), json.loads(copy.read_text())
            for nb in (before, after):
                next(c for c in nb["cells"] if c["cell_type"] == "code")["source"] = ""
            assert before == after, f"{path.name}: --set-repo changed more than the set-up cell's REPO line"

    assert originals == {p.name: p.read_bytes() for p in NOTEBOOKS} | {
        "_config.yml": (REPO_ROOT / "_config.yml").read_bytes()
    }, "the test touched the real book"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_chapter_ends_with_key_takeaways(path: Path):
    last = json.loads(path.read_text())["cells"][-1]
    text = "".join(last["source"])
    assert last["cell_type"] == "markdown" and text.startswith("```{admonition} Key takeaways"), (
        f"{path.name}: end the chapter with a Key takeaways admonition"
    )
    assert text.rstrip().endswith("```")
    bullets = [line for line in text.splitlines() if line.startswith("* ")]
    assert 3 <= len(bullets) <= 4, f"{path.name}: {len(bullets)} takeaways, want 3-4"


def test_intro_chapter_map_links_every_chapter():
    intro = (BOOK / "intro.md").read_text()
    missing = [p.name for p in NOTEBOOKS if f"]({p.name})" not in intro and f"<{p.stem}>`" not in intro]
    assert not missing, f"the intro's chapter map does not link {missing}"


def test_chapters_cite_only_the_papers_figures():
    """The paper has Figures 1 and 2 (and Tables 1 and 2) only."""
    for path in NOTEBOOKS:
        text = " ".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"])
        figures = {int(n) for n in re.findall(r"\bFig(?:\.|ure)\s*(\d+)", text)}
        assert figures <= {1, 2}, f"{path.name} cites the paper's Fig. {sorted(figures - {1, 2})}"


def test_bibliography_renders_without_raw_latex():
    pybtex_database = pytest.importorskip("pybtex.database")
    from pybtex.plugin import find_plugin

    config = yaml.safe_load((REPO_ROOT / "_config.yml").read_text())
    style = find_plugin("pybtex.style.formatting", "unsrt")()
    for bibfile in config["bibtex_bibfiles"]:
        entries = pybtex_database.parse_file(str(REPO_ROOT / bibfile)).entries
        for entry in style.format_entries(entries.values()):
            text = entry.text.render_as("text")
            assert "\\" not in text and "{" not in text, f"{bibfile}: {entry.key} renders as {text!r}"


_HIDDEN_CODE_TAGS = {"hide-input", "hide-cell", "remove-input", "remove-cell"}
MAX_CODE_LINE = 88


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_visible_code_lines_fit_the_page(path: Path):
    """A code line longer than 88 characters runs off the rendered page; cells whose input is
    hidden or removed (hide-input, hide-cell, remove-input, remove-cell) are exempt."""
    too_long = []
    for cell in json.loads(path.read_text())["cells"]:
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell["cell_type"] != "code" or tags & _HIDDEN_CODE_TAGS:
            continue
        too_long += [
            f"{cell.get('id')}: {line[:60]}..."
            for line in "".join(cell["source"]).splitlines()
            if len(line) > MAX_CODE_LINE
        ]
    assert not too_long, f"{path.name}: code lines over {MAX_CODE_LINE} characters: {too_long}"


_FIGURE = re.compile(
    r"^(?P<fence>`{3,}|:{3,})\{figure\}[ \t]*(?P<target>\S*)[ \t]*\n(?P<body>.*?)^(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def _book_markdown() -> list[tuple[str, str]]:
    """(where, text) of every markdown cell of the chapters and of every .md page."""
    texts = [
        (f"{p.name} {c.get('id')}", "".join(c["source"]))
        for p in NOTEBOOKS
        for c in json.loads(p.read_text())["cells"]
        if c["cell_type"] == "markdown"
    ]
    return texts + [(p.name, p.read_text()) for p in sorted(BOOK.glob("*.md"))]


def test_figure_directives_have_a_caption_a_label_and_their_image():
    figures = 0
    for where, text in _book_markdown():
        for match in _FIGURE.finditer(text):
            figures += 1
            lines = match["body"].splitlines()
            options = [line for line in lines if re.match(r"^:[\w-]+:", line)]
            caption = "\n".join(line for line in lines if line not in options).strip()
            assert caption, f"{where}: the {{figure}} {match['target']} has no caption"
            assert any(
                line.startswith(":name:") and line.split(":name:", 1)[1].strip() for line in options
            ), f"{where}: give the {{figure}} {match['target']} a :name: label to reference it by"
            assert match["target"] and (BOOK / match["target"]).is_file(), (
                f"{where}: the {{figure}} image {match['target']!r} does not exist under book/"
            )
    assert figures >= 2, "the intro's pipeline diagram and chapter 2's U-Net diagram are {figure}s"


def test_method_diagrams_regenerate(tmp_path: Path):
    """book/figures/make_figures.py draws both committed diagrams (no data, no model needed)."""
    done = subprocess.run(
        [sys.executable, str(BOOK / "figures" / "make_figures.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stderr
    for name in ("pipeline.png", "unet.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} was not written"
        assert (BOOK / "images" / name).is_file(), f"book/images/{name} is not committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_widget_cells_are_live_only_and_define_nothing(path: Path):
    """An ipywidgets cell can stall the book's executor until its timeout (a race in the Output
    widget's capture): the build and nbval skip it, and it only calls what earlier cells define."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or "interact(" not in cell["source"]:
            continue
        tags = set(cell.get("metadata", {}).get("tags", []))
        assert {"skip-execution", "nbval-skip"} <= tags, (
            f"{path.name}: widget cell {cell.get('id')} runs in CI"
        )
        assert not re.search(r"^(def|class) ", cell["source"], re.M), (
            f"{path.name}: widget cell {cell.get('id')} defines what later cells may need"
        )


def test_page_stylesheet_is_picked_up_and_sizes_code_to_the_column():
    """_static/book.css shrinks code so that an 88-character line fits the article column at
    1280 px and wraps long printed lines; Jupyter Book 1 links every .css under _static/."""
    jb_config = pytest.importorskip("jupyter_book.config")
    final, _ = jb_config.get_final_config(
        user_yaml=REPO_ROOT / "_config.yml",
        cli_config={"latex_individualpages": False},
        sourcedir=REPO_ROOT,
        validate=False,
    )
    assert "book.css" in final["html_css_files"]
    css = (REPO_ROOT / "_static" / "book.css").read_text()
    assert re.search(r"cell_input pre[^{]*\{[^}]*font-size:\s*0\.75rem", css, re.S)
    assert re.search(r"cell_output pre\s*\{[^}]*white-space:\s*pre-wrap", css, re.S)


def test_check_repo_names_the_files_that_point_elsewhere(tmp_path: Path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import nbtools

    (tmp_path / "book").mkdir()
    (tmp_path / "_config.yml").write_text((REPO_ROOT / "_config.yml").read_text())
    for path in NOTEBOOKS[:2]:
        (tmp_path / "book" / path.name).write_text(path.read_text())
    url = "https://github.com/someone/the-book"
    problems = nbtools.repository_problems(url, tmp_path / "book", tmp_path / "_config.yml")
    assert len(problems) == 3 and nbtools.REPO_URL in problems[0]
    nbtools.set_repository(url, tmp_path / "book", tmp_path / "_config.yml")
    assert nbtools.repository_problems(url + "/", tmp_path / "book", tmp_path / "_config.yml") == []
    source = "".join(_first_code_cell(tmp_path / "book" / NOTEBOOKS[0].name)["source"])
    assert "your-org" in nbtools.COLAB_CELL and 'in sys.modules and "your-org" in REPO' in source
    assert "[book]" not in source  # Colab gets the package alone


def test_the_setup_cell_stops_in_colab_with_the_placeholder_repository():
    source = "".join(_first_code_cell(NOTEBOOKS[0])["source"])
    fake_colab = "import sys, types\nsys.modules['google.colab'] = types.ModuleType('google.colab')\n"
    done = subprocess.run(
        [sys.executable, "-c", fake_colab + source], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "names no repository yet: set REPO above" in done.stderr
    assert not Path("/content/book-repo").exists()  # nothing was cloned


def test_checks_of_the_build_stay_out_of_sight():
    """At most ten `assert` lines in the visible code of all chapters together: the checks of the
    build go into cells tagged remove-cell."""
    hidden = {"remove-cell", "remove-input", "hide-cell", "hide-input"}
    visible = 0
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code" and not hidden & set(cell.get("metadata", {}).get("tags", [])):
                visible += len(re.findall(r"^\s*assert\b", "".join(cell["source"]), re.M))
    assert visible <= 10, f"{visible} visible assert lines in the chapters"


def test_the_training_budget_is_printed_once_a_chapter():
    """`training_budget(...)`, an unconditional `print(description)` or `{description}` in an
    f-string (a shipped model's description holds its budget) at most once a chapter."""
    for path in NOTEBOOKS:
        code = "\n".join(
            "".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"
        )
        prints = len(re.findall(r"training_budget\(|\{\w*description\}", code))  # also in f-strings
        prints += len(re.findall(r"^print\(\w*description\)", code, re.M))
        assert prints <= 1, f"{path.name} prints the training budget {prints} times"


def test_visible_code_keeps_to_the_idea():
    """At most 160 non-blank lines of visible code a chapter (plotting helpers hidden)."""
    hidden = {"remove-cell", "remove-input", "hide-cell", "hide-input"}
    for path in NOTEBOOKS:
        lines = sum(
            len([line for line in "".join(c["source"]).splitlines() if line.strip()])
            for c in json.loads(path.read_text())["cells"]
            if c["cell_type"] == "code" and not hidden & set(c.get("metadata", {}).get("tags", []))
        )
        assert lines <= 160, f"{path.name}: {lines} lines of visible code"


def test_figures_are_numbered_and_captioned():
    """At least 80 % of the cells that draw a figure carry a MyST-NB caption and name, and every
    named figure is referenced from the text of its chapter."""
    drawing, captioned = 0, 0
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        text = " ".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        for cell in cells:
            source = "".join(cell["source"])
            if cell["cell_type"] != "code" or not re.search(r"plt\.(subplots|figure)\(|plot_pavpu\(", source):
                continue
            drawing += 1
            figure = cell.get("metadata", {}).get("mystnb", {}).get("figure")
            if figure:
                captioned += 1
                assert figure["caption"].strip() and figure["name"].startswith("fig-"), path.name
                hidden = "hide-cell" in cell.get("metadata", {}).get("tags", [])
                assert hidden or f"`{figure['name']}`" in text, (
                    f"{path.name}: {figure['name']} is never referenced"
                )
    assert captioned >= 0.8 * drawing, f"{captioned} of {drawing} figures captioned"

"""The package's declared dependencies and the conda environment file agree."""

from __future__ import annotations

import ast
import re
import tomllib

import pytest
import yaml
from conftest import REPO_ROOT


def _normalise(req: str) -> tuple[str, str]:
    """``'scikit_learn >= 1.3'`` -> ``('scikit-learn', '>=1.3')`` (PEP 503 name, spec without spaces)."""
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", req)
    assert match, f"cannot parse requirement {req!r}"
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    return name, match.group(2).replace(" ", "")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return dict(_normalise(r) for r in reqs)


def _environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml must have exactly one pip section"
    return dict(_normalise(r) for r in pip_sections[0])


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    assert _environment_requirements() == _pyproject_requirements()


def test_runtime_torch_requirement_is_loose_so_colab_keeps_its_cuda_build():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    torch_req = [r for r in project["dependencies"] if _normalise(r)[0] == "torch"]
    assert torch_req and "==" not in torch_req[0] and ">=" in torch_req[0]


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make book" in readme
    assert re.search(r"^make test$", ci, re.M) and re.search(r"^make book$", ci, re.M)


def _readme_section(title: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start : end if end > 0 else None]


def test_readme_result_numbers_are_rows_of_the_committed_evaluations_or_the_paper():
    import json

    from companion.evaluation.paper import TABLE1

    pairs = {
        (round(r["avAP"], 3), round(r["AP50"], 3))
        for path in (REPO_ROOT / "results").glob("*/results.json")
        for r in json.loads(path.read_text())["rows"]
    }
    pairs |= {(row["avAP"], row["AP50"]) for row in TABLE1.values()}
    quoted = re.findall(
        r"(\d\.\d{3}) / (?:AP50 )?(\d\.\d{3})", _readme_section("Trained models and their results")
    )
    assert len(quoted) >= 4
    for avap, ap50 in quoted:
        assert (float(avap), float(ap50)) in pairs, (
            f"README quotes avAP {avap} / AP50 {ap50}, no evaluated row has it"
        )


def _imports(path, *, top_level_only: bool) -> set[str]:
    """The companion modules a file imports (every import, or only those at module level)."""
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)  # TYPE_CHECKING blocks are ast.If
    targets = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module:
                targets.add(".".join(base + node.module.split(".")))
            else:  # from . import x, y
                targets.update(".".join(base + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("companion"):
            base = node.module
            targets.add(base)
            if base == "companion":  # from companion import data: the sub-package
                targets.update(f"companion.{a.name}" for a in node.names)
            else:
                targets.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.startswith("companion"))
    return targets


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if path.name == "__init__.py" else parts)


def _module_imports(top_level_only: bool = True) -> dict[str, set[str]]:
    """companion module -> the companion modules it imports (at module level, by default)."""
    paths = sorted((REPO_ROOT / "companion").rglob("*.py"))
    graph = {_module_name(p): _imports(p, top_level_only=top_level_only) for p in paths}
    return {m: {t for t in ts if t in graph} for m, ts in graph.items()}


#: The sub-packages in the order the data flows; each imports only those before it.
LAYERS = ("data", "model", "pretrained", "inference", "evaluation", "training", "book", "cli")


def _layer(module: str) -> int:
    """Index of a module's sub-package in LAYERS; -1 for the private helpers at the top."""
    parts = module.split(".")
    return -1 if len(parts) == 1 or parts[1].startswith("_") else LAYERS.index(parts[1])


def test_each_layer_imports_only_the_layers_below_it():
    modules = _module_imports(top_level_only=False)  # imports inside functions count too
    assert {m.split(".")[1] for m in modules if m.count(".")} - {"_io", "_device", "__main__"} == set(LAYERS)
    upward = [
        f"{module} -> {target}"
        for module, targets in modules.items()
        if module not in ("companion", "companion.__main__")  # the lazy loader, the entry point
        for target in targets
        if target != "companion" and _layer(target) > _layer(module)
    ]
    assert not upward, "imports that climb a layer: " + "; ".join(sorted(upward))
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((REPO_ROOT / "companion" / layer / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"companion/{layer}/__init__.py does not say what it may import"


def test_companion_modules_import_each_other_without_a_cycle():
    graph = _module_imports()
    assert "companion.cli" in graph and "companion.training.export" in graph["companion.book.chapters"]
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join(path + (module,))
        if module in done:
            return
        for target in graph[module]:
            visit(target, path + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_every_module_stays_short_and_is_listed_in_the_readme():
    readme = (REPO_ROOT / "README.md").read_text()
    for path in sorted((REPO_ROOT / "companion").rglob("*.py")):
        if path.name.startswith("_"):
            continue  # __init__, __main__, private helpers
        lines = len(path.read_text().splitlines())
        assert lines <= 500, f"{path.relative_to(REPO_ROOT)}: {lines} lines, split it by concept"
    for path in sorted((REPO_ROOT / "companion").rglob("*.py")):
        if not path.name.startswith("_") and path.parent.name != "cli":
            name = _module_name(path)
            assert f"`{name}`" in readme, f"{name} is not in the README's module table"


@pytest.mark.slow
def test_a_wheel_installed_outside_the_repository_predicts_with_the_best_rows_recipe(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    import numpy as np
    import tifffile

    from companion.inference.recipes import rows

    def run(*argv: str, cwd=tmp_path, **env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
        return subprocess.run(argv, cwd=cwd, env=clean, capture_output=True, text=True, timeout=600)

    source = tmp_path / "source"  # a copy: building in the repository would leave build/ there
    shutil.copytree(
        REPO_ROOT / "companion", source / "companion", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO_ROOT / name).is_file():
            shutil.copy(REPO_ROOT / name, source / name)
    built = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path / "dist"),
        str(source),
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("companion-*.whl")
    site = tmp_path / "site"
    installed = run(
        sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    image = (np.random.default_rng(0).random((2, 96, 128)) * 4095).astype(np.uint16)
    tifffile.imwrite(tmp_path / "X.tif", image, photometric="minisblack")
    where = run(sys.executable, "-c", "import companion; print(companion.__file__)", PYTHONPATH=str(site))
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr  # not the repository's
    predicted = run(
        sys.executable,
        "-m",
        "companion",
        "predict",
        "--pretrained",
        "baseline",
        "--images",
        "X.tif",
        "--out",
        "D",
        PYTHONPATH=str(site),
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert f"(row {rows('baseline')[0]}, bandwidth 1.5, threshold 1.5)" in predicted.stdout
    assert (tmp_path / "D" / "X.npz").is_file() and (tmp_path / "D" / "X.overlay.png").is_file()

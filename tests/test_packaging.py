"""The package's declared dependencies and the conda environment file agree."""

from __future__ import annotations

import re
import tomllib

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

    from companion.paper import TABLE1

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

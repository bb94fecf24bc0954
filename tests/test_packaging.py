"""pyproject.toml's floors are what the code needs: requires-python covers the syntax and the standard library
the package uses, and the torch and triton minimums have the APIs it calls. Metadata lives there only."""

import ast
import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import fastgradstats
from fastgradstats import dispatch

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("fastgradstats", "kernels")  # what is installed (kernels/ as fastgradstats.kernels)

# Standard-library names newer than Python 3.10, and the version that added each.
STDLIB_SINCE = {
    "typing.Self": (3, 11), "typing.LiteralString": (3, 11), "typing.Never": (3, 11),
    "typing.assert_never": (3, 11), "typing.reveal_type": (3, 11), "typing.dataclass_transform": (3, 11),
    "tomllib": (3, 11), "enum.StrEnum": (3, 11), "datetime.UTC": (3, 11), "asyncio.TaskGroup": (3, 11),
    "asyncio.timeout": (3, 11), "contextlib.chdir": (3, 11), "hashlib.file_digest": (3, 11),
    "typing.override": (3, 12), "typing.TypeAliasType": (3, 12), "itertools.batched": (3, 12),
    "math.sumprod": (3, 12), "warnings.deprecated": (3, 13), "copy.replace": (3, 13),
}
# torch APIs newer than torch 2.1, and the release that added each (pytorch/pytorch#139662 for both).
TORCH_SINCE = {"torch.nn.utils.get_total_norm": (2, 6), "torch.nn.utils.clip_grads_with_norm_": (2, 6)}
# The Triton each torch release pins on Linux x86_64 (their wheels' Requires-Dist).
TRITON_PINNED_BY_TORCH = {(2, 6): (3, 2), (2, 7): (3, 3), (2, 8): (3, 4)}


@pytest.fixture(scope="module")
def setup_kwargs() -> dict:
    """The floors of pyproject.toml's [project] table, under setuptools' keyword names."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {"python_requires": project["requires-python"], "install_requires": project["dependencies"],
            "extras_require": project["optional-dependencies"]}


def floor(specifier: str) -> tuple[int, int]:
    """(major, minor) of the ">=" bound in a version specifier such as ">=3.11" or ">=3.4,<4"."""
    bounds = [s.version for s in Requirement(f"x{specifier}").specifier if s.operator == ">="]
    assert len(bounds) == 1, f"expected one >= bound in {specifier!r}"
    major, minor, *_ = (int(part) for part in bounds[0].split(".") + ["0"])
    return major, minor


def requirements(setup_kwargs: dict, name: str) -> dict[str, list[Requirement]]:
    """Where ("install_requires" or "extra:<name>") -> the requirements on package ``name`` there."""
    groups = {"install_requires": setup_kwargs["install_requires"]}
    groups.update({f"extra:{extra}": listed for extra, listed in setup_kwargs["extras_require"].items()})
    found = {where: [r for r in map(Requirement, listed) if r.name == name]
             for where, listed in groups.items()}
    return {where: listed for where, listed in found.items() if listed}


def modules() -> list[Path]:
    return sorted(path for folder in PACKAGE_DIRS for path in (REPO / folder).rglob("*.py"))


def trees() -> list[ast.Module]:
    return [ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for path in modules()]


def used_names(tree: ast.AST) -> set[str]:
    """Dotted names a module imports or reads: "typing.Self" for ``from typing import Self`` and for
    ``typing.Self``, "torch.nn.utils.get_total_norm" for that attribute chain."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Attribute):
            parts = [node.attr]
            value = node.value
            while isinstance(value, ast.Attribute):
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name):
                names.add(".".join([value.id, *reversed(parts)]))
    return names


def all_used_names() -> set[str]:
    return set().union(*map(used_names, trees()))


def test_every_module_parses_with_the_python_floor(setup_kwargs):
    version = floor(setup_kwargs["python_requires"])
    for path in [*modules(), REPO / "setup.py"]:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=version)


def test_the_python_floor_has_the_standard_library_the_package_uses(setup_kwargs):
    needs = {name: since for name, since in STDLIB_SINCE.items() if name in all_used_names()}
    too_new = {name: since for name, since in needs.items() if since > floor(setup_kwargs["python_requires"])}
    assert not too_new, f"python_requires={setup_kwargs['python_requires']!r} but the package uses {too_new}"


def test_the_python_floor_is_the_targeted_311(setup_kwargs):
    assert floor(setup_kwargs["python_requires"]) == (3, 11)  # monitor.py returns typing.Self


def test_the_torch_floor_has_the_apis_the_package_calls(setup_kwargs):
    used = all_used_names()
    needed = max([since for name, since in TORCH_SINCE.items() if name in used], default=(2, 1))
    (torch,) = requirements(setup_kwargs, "torch")["install_requires"]
    assert floor(str(torch.specifier)) >= needed


def test_the_triton_floor_is_the_one_dispatch_checks(setup_kwargs):
    tritons = requirements(setup_kwargs, "triton")
    assert {"extra:triton", "extra:dev", "extra:all"} <= set(tritons)
    for where, (triton,) in tritons.items():
        assert floor(str(triton.specifier)) == dispatch.TRITON_MIN_VERSION, where


def test_extras_with_triton_ask_for_a_torch_that_allows_it(setup_kwargs):
    torches = requirements(setup_kwargs, "torch")
    for where, (triton,) in requirements(setup_kwargs, "triton").items():
        triton_floor = floor(str(triton.specifier))
        needed = min(torch for torch, pinned in TRITON_PINNED_BY_TORCH.items() if pinned >= triton_floor)
        torch_floor = max(floor(str(r.specifier)) for r in torches.get(where, torches["install_requires"]))
        assert torch_floor >= needed, f"{where}: torch {torch_floor} pins a triton older than {triton_floor}"


def test_the_version_is_declared_once():
    assert importlib.metadata.version("fastgradstats") == fastgradstats.__version__
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "version" in project["dynamic"]
    assert "version" not in (REPO / "setup.py").read_text(encoding="utf-8")

"""The house rules of docs/ARCHITECTURE.md, as tests: small modules, short functions, a frozen configuration.
The layer contract itself is import-linter's (pyproject.toml), run by ``make test`` beside pytest."""

import ast
import dataclasses
import pathlib

import pytest

import vggnet
from vggnet.training import resolve_config

SRC = pathlib.Path(vggnet.__file__).parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules():
    return sorted(SRC.rglob("*.py"))


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in modules()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def _body_lines(node: ast.FunctionDef) -> int:
    """Lines of a function's body without its docstring."""
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        if len(body) == 1:
            return 0
        first = body[1]
    return node.end_lineno - first.lineno + 1


def test_no_function_is_over_60_lines():
    """Argument tables (a verb's ``add_parser``: one add_argument per option) aside."""
    long = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "add_parser":
                if _body_lines(node) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(SRC)}:{node.name}"] = _body_lines(node)
    assert long == {}


def test_the_layer_contract_is_configured_over_every_top_level_package():
    """import-linter checks what pyproject.toml lists, and its ``exhaustive`` option fails on a package left out;
    this pins the layers the docs draw."""
    import tomllib

    config = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")
    assert layers["layers"] == ["cli", "bench", "training | use", "evaluation", "store", "data | runtime", "net",
                                "base"] and layers["exhaustive"] is True
    assert {c["type"] for c in config["contracts"]} == {"layers", "acyclic_siblings", "forbidden"}


def test_a_resolved_train_config_never_changes():
    """TrainConfig is the input, not a scratch pad: derived values live on the built run."""
    config = resolve_config(epochs=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 5
    assert config.complete() is config  # already complete: nothing to fill, the same object


def test_vggnet_is_imported_inside_functions_only_by_the_cli():
    """An import inside a function hides the real graph (the contract counts it, a reader does not see it): only
    cli/ may import a verb's library when the verb runs, so that ``vggnet --help`` stays light."""
    hidden = []
    for path in modules():
        if path.relative_to(SRC).parts[0] == "cli":
            continue
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{path.relative_to(SRC)}:{node.lineno}" for node in ast.walk(function)
                           if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vggnet")]
    assert hidden == []

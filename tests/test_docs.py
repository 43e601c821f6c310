"""The examples of README.md and docs/*.md, checked against the code they call, so that the docs cannot drift:

- every layer name an example uses (``vggnet features/explain --layer``, ``--svd fc6=``, ``forward_named``,
  ``extract_features``, ``PerceptualLoss``, ``grad_cam``, ``explain_files``) exists in the model that example builds
  or loads: a run directory is the model its ``vggnet train --out`` line trains (the default recipe's VGG-11 when the
  docs do not train it), a weights file the registry model its name says;
- ``vggnet train --resume RUN --epochs N`` extends a run the same docs train, on a schedule that can be extended;
- every ``import vggnet...`` / ``from vggnet... import`` and ``vggnet.NAME`` in a Python example resolves.
"""

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

import vggnet
from vggnet.cli import build_parser
from vggnet.net.compressed import fc_layers
from vggnet.training import DECAYING, resolve_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "ARCHITECTURE.md")]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
#: Names of layers that depend on the configuration (pool1..pool5 exist in every VGG).
LAYER = re.compile(r"\b(?:conv|bn|relu)\d_\d\b")
#: A weights file named after its registry model: torchvision's vgg16-397923af.pth, Keras' vgg19_weights_tf_...h5.
WEIGHTS_FILE = re.compile(r"(?:^|/)(vgg\d\d(?:_bn)?)(?:[-._]|$)")
#: What ``vggnet.load`` / a SOURCE argument means when a doc uses a run it never trains: a default-recipe run.
DEFAULT_RUN = {"preset": None}


def blocks(path, *languages):
    return [code for language, code in BLOCK.findall(path.read_text()) if language in languages]


def shell_commands(path):
    """``(tokens after "vggnet", the line)`` of each vggnet command in the sh blocks of ``path``, comments left out."""
    for code in blocks(path, "sh", ""):
        for line in code.splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            starts = [i for i, t in enumerate(tokens) if t == "vggnet" or t.endswith("/vggnet")]
            if starts and len(tokens) > starts[0] + 1:
                yield [t.strip("[]") for t in tokens[starts[0] + 1:]], line


def option_values(tokens, flag):
    return [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == flag]


def trained_runs(path):
    """{run directory: the train options of the ``vggnet train ... --out DIR`` line that makes it} in ``path``."""
    runs = {}
    for tokens, _ in shell_commands(path):
        if tokens[0] == "train" and "--out" in tokens and "--resume" not in tokens:
            args = build_parser().parse_args(tokens)
            options = {k: v for k, v in vars(args).items()
                       if k not in {"verb", "run", "resume", "json", "preset", "out"} and v is not None}
            runs[args.out] = {"preset": args.preset, **options}
    return runs


def tiny(name, head="gap", arch=None):
    """A small model with ``name``'s layer names (width and size do not change them; the head names the FC layers)."""
    return vggnet.create_model(name, arch=arch, width=1 / 16, head=head, hidden=16, num_classes=10, in_channels=1,
                               input_size=32)


def model_of(source, runs):
    """The model a SOURCE (a run directory or a weights file, as an example names it) loads, or None if unknown."""
    match = WEIGHTS_FILE.search(source)
    if match:
        return tiny(match.group(1), head="classic")
    if source.startswith(("runs/", "/tmp/")) or source in runs:
        options = dict(runs.get(source, DEFAULT_RUN))
        config = resolve_config(options.pop("preset"), **options)
        return tiny(config.model, head=config.head, arch=config.arch)
    return None


# ------------------------------------------------------------------------------------------------ the CLI examples
def cli_layer_uses(path):
    """``(line, SOURCE, layer names, FC names of --svd)`` of every features, explain and compress example."""
    for tokens, line in shell_commands(path):
        if tokens[0] in ("features", "explain", "compress") and len(tokens) > 1 and not tokens[1].isupper():
            svd = [part.split("=")[0] for spec in option_values(tokens, "--svd") for part in spec.split(",")]
            yield line, tokens[1], option_values(tokens, "--layer"), svd


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_cli_examples_name_layers_of_the_model_they_load(path):
    runs = trained_runs(path)
    wrong = []
    for line, source, layers, svd in cli_layer_uses(path):
        model = model_of(source, runs)
        if model is None:
            wrong.append(f"{line!r}: the model of {source} is unknown to this test")
            continue
        wrong += [f"{line!r}: {name} is not a layer of {model.config['name']}" for name in layers
                  if name not in model.layer_names]
        wrong += [f"{line!r}: {name} is not an FC layer of {model.config['name']}" for name in svd
                  if name not in fc_layers(model)]
    assert wrong == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_layer_name_in_a_cli_example_is_checked(path):
    """A layer name on any other verb's line would go unchecked: extend cli_layer_uses first."""
    checked = {name for _, _, layers, _ in cli_layer_uses(path) for name in layers}
    named = {name for _, line in shell_commands(path) for name in LAYER.findall(line.split("#")[0])}
    assert named - checked == set()


def test_the_readme_uses_layers_of_the_default_recipe_where_it_uses_a_run():
    """The README's features examples load a run of ``vggnet train`` without options: its layers (a VGG-11)."""
    default = model_of("runs/RUN", {})
    assert resolve_config().model == "vgg11_bn" and "relu5_3" not in default.layer_names
    uses = [u for u in cli_layer_uses(ROOT / "README.md") if u[1] == "runs/RUN" and u[2]]
    assert len(uses) >= 4 and all(name in default.layer_names for u in uses for name in u[2])


# ------------------------------------------------------------------------------------------------ Python examples
def _call_name(call):
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _strings(node):
    """The string constants of a list/tuple literal, or of a single string constant."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def _argument(call, position, keyword):
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    return call.args[position] if len(call.args) > position else None


#: Calls whose layer names belong to a model: {function: (position of the model or source, of the names, keyword)}.
LAYER_CALLS = {"forward_named": (None, 1, "layers"), "extract_features": (0, 2, "layers"),
               "PerceptualLoss": (0, 1, "layers"), "grad_cam": (0, 2, "layer"), "raw_grad_cam": (0, 2, "layer"),
               "explain_files": (0, 3, "layer")}


class Models:
    """The model each name of a Python example holds (``x = vggnet.create_model(...)``, ``x = vggnet.load(...)``,
    ``x.model``), as far as literals say."""

    def __init__(self, runs):
        self.runs, self.names = runs, {}

    def assign(self, target, value):
        if isinstance(target, ast.Name) and isinstance(value, ast.Call):
            model = self.of_call(value)
            if model is not None:
                self.names[target.id] = model

    def of_call(self, call):
        name = _call_name(call)
        if name == "create_model" and call.args and isinstance(call.args[0], ast.Constant):
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg in ("arch", "head")}
            return tiny(call.args[0].value, head=kwargs.get("head", "gap"), arch=kwargs.get("arch"))
        if name == "load" and call.args:
            return self.of(call.args[0])
        return None

    def of(self, node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return model_of(node.value, self.runs)
        if isinstance(node, ast.Attribute) and node.attr == "model":
            return self.of(node.value)
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        return None


def python_layer_uses(path):
    """``(source line, model or None, layer names)`` of every layer-naming call in the Python examples of ``path``,
    and the layer-like strings of those examples that no such call names (comments, which show output, aside)."""
    runs, uses, loose = trained_runs(path), [], []
    for code in blocks(path, "python"):
        models, named = Models(runs), set()
        for statement in ast.parse(code).body:
            for node in ast.walk(statement):
                if isinstance(node, ast.Call) and _call_name(node) in LAYER_CALLS:
                    where, position, keyword = LAYER_CALLS[_call_name(node)]
                    model_node = node.func.value if where is None else _argument(node, where, "source")
                    layers = _strings(_argument(node, position, keyword))
                    uses.append((ast.get_source_segment(code, node), models.of(model_node), layers))
                    named.update(layers)
            if isinstance(statement, ast.Assign):
                models.assign(statement.targets[0], statement.value)
        loose += [node.value for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant)
                  and isinstance(node.value, str) and LAYER.fullmatch(node.value) and node.value not in named]
    return uses, loose


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_examples_name_layers_of_the_model_they_build_or_load(path):
    uses, loose = python_layer_uses(path)
    wrong = [f"{text}: the model is unknown to this test" for text, model, _ in uses if model is None]
    wrong += [f"{text}: {name} is not a layer of {model.config['name']}" for text, model, layers in uses
              if model is not None for name in layers if name not in model.layer_names]
    assert wrong == []
    assert loose == []  # a layer name outside the calls above: extend LAYER_CALLS


def test_the_readme_python_examples_are_checked():
    uses, _ = python_layer_uses(ROOT / "README.md")
    calls = sorted({text.split("(")[0].rsplit(".", 1)[-1] for text, _, _ in uses})
    assert calls == ["PerceptualLoss", "extract_features", "forward_named"]
    assert sum(len(layers) for _, _, layers in uses) >= 8


# ------------------------------------------------------------------------------------------------ resume, imports
@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_resume_with_more_epochs_extends_a_run_that_can_be_extended(path):
    """``--resume RUN --epochs N``: RUN is trained by the same docs (``--out RUN``), its schedule does not end at a
    learning rate of 0 (vggnet.training.DECAYING refuses those), and N is beyond its epochs."""
    runs = trained_runs(path)
    for tokens, line in shell_commands(path):
        if tokens[0] == "train" and "--resume" in tokens and "--epochs" in tokens:
            run, epochs = option_values(tokens, "--resume")[0], int(option_values(tokens, "--epochs")[0])
            assert run in runs, f"{line!r}: no `vggnet train ... --out {run}` line says which recipe {run} ran"
            options = dict(runs[run])
            config = resolve_config(options.pop("preset"), **options)
            assert config.schedule not in DECAYING, f"{line!r}: {run} runs {config.schedule}, which cannot be extended"
            assert epochs > config.epochs, line


def test_the_readme_shows_an_extension():
    lines = [line for tokens, line in shell_commands(ROOT / "README.md") if "--resume" in tokens and "--epochs" in tokens]
    assert len(lines) == 1


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_examples_import_what_exists(path):
    missing = []
    for code in blocks(path, "python"):
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vggnet":
                try:
                    module = importlib.import_module(node.module)
                except ImportError:
                    missing.append(node.module)
                    continue
                missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "vggnet":
                        try:
                            importlib.import_module(alias.name)
                        except ImportError:
                            missing.append(alias.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "vggnet":
                if not hasattr(vggnet, node.attr):
                    missing.append(f"vggnet.{node.attr}")
    assert missing == []

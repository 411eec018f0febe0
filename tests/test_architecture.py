"""The package's shape: module size, an acyclic import graph, side-effect-free imports, no
environment reads on the forward path, and every package directory installed."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# source folder of each installed package prefix (patches/ installs as megacpp_mcore.patches)
SOURCES = {"megacpp_mcore": ROOT / "megacpp_mcore", "megacpp_mcore.patches": ROOT / "patches"}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    modules = {}
    for prefix, base in SOURCES.items():
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


MODULES = _modules()


class _Imports(ast.NodeVisitor):
    """Package modules imported by one module, split into module-level and function-level."""

    def __init__(self, name: str, is_package: bool):
        self.package = name if is_package else name.rpartition(".")[0]
        self.depth = 0
        self.module_level: set[str] = set()
        self.function_level: set[str] = set()

    def _add(self, target: str) -> None:
        # the deepest package module that ``target`` names (a.b.c -> a.b when c is an attribute)
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target:
            (self.function_level if self.depth else self.module_level).add(target)

    def _absolute(self, module: str | None, level: int) -> str:
        if not level:
            return module or ""
        base = self.package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node):
        module = self._absolute(node.module, node.level)
        for alias in node.names:
            self._add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)

    def visit_If(self, node):
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:  # the TYPE_CHECKING branch never runs
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function


def _graph(include_function_level: bool) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        visitor = _Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        edges = visitor.module_level | (visitor.function_level if include_function_level else set())
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def strongconnect(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            strongconnect(name)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_over_the_line_limit():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycle_at_module_level():
    graph = _graph(include_function_level=False)
    assert "megacpp_mcore.spec.compose" in graph["megacpp_mcore.layers.attention"]  # graph is read
    assert _cycles(graph) == []


def test_no_import_cycle_counting_function_level_imports():
    """Imports deferred into functions (to keep ``import megacpp_mcore`` light) close no cycle
    either: every dependency points one way through the layers."""
    assert _cycles(_graph(include_function_level=True)) == []


_IMPORT_PROBE = textwrap.dedent("""
    import json, sys, traceback
    import torch

    cuda_inits = []
    original = torch.cuda._lazy_init

    def recording_lazy_init():
        cuda_inits.append("".join(traceback.format_stack(limit=8)))
        return original()

    torch.cuda._lazy_init = recording_lazy_init  # torch.cuda's own calls look this name up
    import importlib
    module = importlib.import_module(sys.argv[1])
    for attr in getattr(module, "__all__", []):
        getattr(module, attr)
    print(json.dumps({
        "cuda_inits": cuda_inits,
        "cuda_initialized": torch.cuda.is_initialized(),
        "patch_modules": sorted(m for m in sys.modules if m.startswith("megacpp_mcore.patches")),
    }))
""")


def _layer_spec_modules() -> list[str]:
    return sorted(f"layer_specs.{p.stem}" for p in (ROOT / "layer_specs").glob("*.py")
                  if p.stem != "__init__")


@pytest.mark.parametrize("module", ["megacpp_mcore", *_layer_spec_modules()])
def test_import_has_no_side_effects(module):
    """No CUDA initialisation and no patch: a patch is applied only by importing its module, and
    importing the package or a spec module imports none."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, module], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cuda_inits"] == [] and not report["cuda_initialized"], report["cuda_inits"]
    assert report["patch_modules"] == []


def test_importing_the_package_does_not_import_megatron():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, megacpp_mcore; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'torch')))"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------- environment on the forward path
FORWARD_NAMES = {"forward", "backward", "setup_context"}
ENV_NAMES = {"environ", "getenv", "environb", "getenvb"}


def _env_reads_in_forward(tree: ast.AST) -> list[str]:
    """``os.environ``/``getenv`` uses inside forward/backward functions (nested ones included)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in FORWARD_NAMES:
            for inner in ast.walk(node):
                name = inner.attr if isinstance(inner, ast.Attribute) else getattr(inner, "id", None)
                if name in ENV_NAMES:
                    found.append(f"{node.name}:{inner.lineno}")
    return found


def test_env_read_finder_finds_one():
    tree = ast.parse("class F:\n    def forward(self, x):\n        import os\n"
                     "        return os.environ.get('X')\n")
    assert _env_reads_in_forward(tree) == ["forward:4"]


def test_no_environment_read_in_forward_functions():
    found = {name: hits for name, path in MODULES.items()
             if (hits := _env_reads_in_forward(ast.parse(path.read_text())))}
    assert not found, f"environment read on the forward path: {found}"


class _RecordingEnviron(dict):
    """``os.environ`` stand-in recording reads made from package files."""

    def __init__(self, data):
        super().__init__(data)
        self.reads: list[str] = []

    def _record(self, key):
        frame = sys._getframe(2)  # the reader: past _record and the dict method
        if frame.f_code.co_name == "getenv" and frame.f_back is not None:
            frame = frame.f_back  # os.getenv -> its caller
        if str(ROOT / "megacpp_mcore") in frame.f_code.co_filename:
            self.reads.append(f"{key} at {frame.f_code.co_filename}:{frame.f_lineno}")

    def __getitem__(self, key):
        self._record(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._record(key)
        return super().get(key, default)

    def __contains__(self, key):
        self._record(key)
        return super().__contains__(key)


def test_recording_environ_sees_package_reads(monkeypatch):
    import os

    recording = _RecordingEnviron(os.environ)
    monkeypatch.setattr(os, "environ", recording)
    code = compile("import os\nos.environ.get('A')\nos.getenv('B')\n'C' in os.environ\n",
                   str(ROOT / "megacpp_mcore" / "probe.py"), "exec")
    exec(code, {})
    os.environ.get("D")  # this test file is not the package
    assert [r.split(" at ")[0] for r in recording.reads] == ["A", "B", "C"]


def test_forward_and_backward_read_no_environment(single_rank, monkeypatch):
    """A hybrid model with every layer feature (MLA, MoD, MoDA) reads no environment variable in
    its forward and backward passes."""
    import os

    from megacpp_mcore.features.mod import MoDConfig
    from megacpp_mcore.features.moda import MoDAConfig
    from megacpp_mcore.spec.pattern import FeaturePlacement
    from megacpp_mcore.testing.parity import model_from_spec
    from megacpp_mcore.train import runtime

    spec = {"pattern": "AEMR", "num_layers": 8, "hidden_size": 64, "num_attention_heads": 4,
            "ffn_hidden_size": 128, "vocab_size": 128, "seq_length": 32, "moe": None,
            "mla": {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_head_dim": 16,
                    "qk_pos_emb_head_dim": 8, "v_head_dim": 16}}
    model = model_from_spec(spec).replace(features={
        "mod": MoDConfig(placement=FeaturePlacement(symbols="E")),
        "moda": MoDAConfig(placement=FeaturePlacement(symbols="A"))})
    (gpt,) = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                 backend="local", wrap_ddp=False)
    tokens = torch.randint(0, 128, (2, 32))
    recording = _RecordingEnviron(os.environ)
    monkeypatch.setattr(os, "environ", recording)
    loss = gpt(tokens, torch.arange(32).expand(2, -1), None, labels=tokens)
    loss.float().mean().backward()
    assert recording.reads == []


# ------------------------------------------------------------------------------------- packaging
def test_every_package_directory_is_installed():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = dict(setuptools.get("package-dir", {}))
    found = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    found |= {"layer_specs"} if (ROOT / "layer_specs" / "__init__.py").exists() else set()
    assert sorted(found) == sorted(setuptools["packages"])
    assert dirs == {"megacpp_mcore.patches": "patches"}


def test_public_names_earlier_work_promised_still_import():
    """Names documented before the package layout (README, docs, issue notes) keep working where
    they were documented (re-exported where they moved), and so does every layer_specs object."""
    import importlib

    import megacpp_mcore
    from megacpp_mcore import moda, mtp, pattern

    assert callable(megacpp_mcore.hybrid_block_spec)
    assert pattern.expand_pattern("AEMR", 8) == list("AEMRAEMR")
    assert issubclass(pattern.PatternError, ValueError)
    assert [float(w) for w in mtp.step_weights(2, decay=1.0)] == [0.5, 0.5]
    assert callable(mtp.roll_and_mask) and callable(mtp.cast_keeping_shard_markers)
    import torch

    assert moda.depth_kv_bytes(1, 2, 3, 4, 5, torch.bfloat16) == 1 * 2 * 3 * 4 * 5 * 2 * 2
    assert importlib.util.find_spec("megacpp_mcore.launch_pretrain") is not None
    for module, names in {"layer_specs.nam56r": ("NAM56R", "NAM56R_DENSE_ATTENTION", "AE"),
                          "layer_specs.nam56r_lite": ("NAM56R_LITE", "NAM56R_LITE_LOCAL",
                                                      "NAM56R_LITE_AE")}.items():
        loaded = importlib.import_module(module)
        for name in names:
            assert getattr(loaded, name).submodules.pattern, (module, name)

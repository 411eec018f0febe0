"""Which flags a Megatron-LM checkout's ``pretrain_gpt.py`` accepts, read from its source.

``megatron.training`` cannot be imported on a CPU host (it imports triton), so tests that check our
launcher and recipes against Megatron-LM's parser read ``megatron/training/arguments.py`` instead:
explicit ``add_argument`` calls, plus the dataclass fields that its ``ArgumentGroupFactory`` turns
into flags (``--field-name``; ``--no-field-name``/``--disable-field-name`` for store-false booleans),
minus each factory's ``exclude`` list.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
from pathlib import Path

ARGUMENTS_PY = "megatron/training/arguments.py"


class GitTree:
    """Files of ``tag`` in the git directory ``git_dir`` (e.g. a mirror of NVIDIA/Megatron-LM)."""

    def __init__(self, git_dir: str | Path, tag: str):
        self.git_dir, self.tag = str(git_dir), tag

    def _git(self, *args: str) -> str:
        return subprocess.run(["git", "--git-dir", self.git_dir, *args], capture_output=True,
                              text=True, check=True).stdout

    def read(self, path: str) -> str:
        return self._git("show", f"{self.tag}:{path}")

    def files_defining(self, class_name: str) -> list[str]:
        proc = subprocess.run(
            ["git", "--git-dir", self.git_dir, "grep", "-l", "-E", rf"^class {class_name}\b",
             self.tag, "--", "megatron"], capture_output=True, text=True)
        return [line.split(":", 1)[1] for line in proc.stdout.splitlines()]


def _class_fields(tree: GitTree, name: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """Annotated field names of dataclass ``name`` and of its bases defined in the tree."""
    fields: set[str] = set()
    for path in tree.files_defining(name):
        for node in ast.parse(tree.read(path)).body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                annotated = [s for s in node.body
                             if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
                fields |= {s.target.id for s in annotated}
                # flags renamed through field metadata ("argparse_meta": {"arg_names": [...]})
                fields |= {c.value[2:].replace("-", "_") for s in annotated if s.value is not None
                           for c in ast.walk(s.value)
                           if isinstance(c, ast.Constant) and str(c.value).startswith("--")}
                for base in node.bases:
                    if isinstance(base, ast.Name) and base.id not in seen | {name}:
                        fields |= _class_fields(tree, base.id, seen | {name})
    return fields


def _exclude(call: ast.Call, func: ast.FunctionDef) -> list[str]:
    for kw in call.keywords:
        if kw.arg != "exclude":
            continue
        if isinstance(kw.value, ast.Name):  # exclude=<variable assigned in the same function>
            for node in ast.walk(func):
                if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                        and node.targets[0].id == kw.value.id):
                    return list(ast.literal_eval(node.value))
        return list(ast.literal_eval(kw.value))
    return []


@functools.cache
def parser_dests(git_dir: str, tag: str = "core_v0.16.1") -> frozenset[str]:
    """``dest`` of every option of ``pretrain_gpt.py``'s parser at ``tag`` (for options renamed by
    dataclass field metadata, the renamed flag's name with underscores as well)."""
    tree = GitTree(git_dir, tag)
    module = ast.parse(tree.read(ARGUMENTS_PY))
    dests: set[str] = set()
    for func in (n for n in ast.walk(module) if isinstance(n, ast.FunctionDef)):
        for call in (n for n in ast.walk(func) if isinstance(n, ast.Call)):
            if getattr(call.func, "id", "") == "ArgumentGroupFactory" and call.args:
                dests |= _class_fields(tree, call.args[0].id) - set(_exclude(call, func))
            elif getattr(call.func, "attr", "") == "add_argument":
                dest = next((k.value.value for k in call.keywords if k.arg == "dest"), None)
                longs = [a.value for a in call.args
                         if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
                if dest or longs:
                    dests.add(dest or longs[0][2:].replace("-", "_"))
    return frozenset(dests)


def flag_known(flag: str, dests: frozenset[str]) -> bool:
    """Whether ``--some-flag`` sets one of ``dests`` (``--no-x``/``--disable-x`` set ``x``)."""
    name = flag[2:].replace("-", "_")
    base = re.sub(r"^(no|disable)_", "", name)
    return name in dests or base in dests

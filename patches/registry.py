"""Loads the patches listed in :data:`patches.REGISTRY`, reports their status and applies them.

The status of a patch answers the upgrade question "keep, retire or re-base?":

========================  ==========  ============================================================
``check()``               action      meaning
========================  ==========  ============================================================
``needed``                keep        the upstream defect is present; the patch is applied
``fixed-upstream``        retire      upstream behaves correctly now; delete the patch
``target-missing``        re-base     what the patch changes moved or vanished; rewrite it
(``REQUIRES`` missing)    n/a         the patch targets an optional package (module-level
                                      ``REQUIRES``, e.g. Transformer Engine) absent on this host
(``SCOPE`` elsewhere)     n/a         the patch is for another kind of host (``SCOPE = "cpu"``:
                                      only hosts without CUDA); it is never applied here
========================  ==========  ============================================================

A patch whose check says ``needed`` on an installed version outside its ``TARGETS`` is still
applied (its probe found the same defect), and the status notes that ``TARGETS`` should be widened
after review.

:func:`apply_needed` is the one function every entry point calls (``megacpp-mcore train`` through
``runtime.initialize``, the launcher, ``megacpp-mcore patches apply``, the test harness): it applies
every entry whose status is ``needed`` on the given host and nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
from types import ModuleType
from typing import Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

import megacpp_mcore.patches as patches

CHECK_RESULTS = ("needed", "fixed-upstream", "target-missing")
ACTIONS = {"needed": "keep", "fixed-upstream": "retire", "target-missing": "re-base",
           "not-applicable": "n/a"}
PROTOCOL = ("NAME", "TARGETS", "DESCRIPTION", "check", "apply")
HOSTS = ("cpu", "cuda")
# SCOPE -> the hosts an entry is applied on ("any" is the default when a module sets no SCOPE)
SCOPES = {"any": HOSTS, "cpu": ("cpu",)}


class PatchProtocolError(ValueError):
    """A patch module does not follow the protocol of :mod:`patches`."""


def load(module_name: str) -> ModuleType:
    """Imports patch ``module_name`` and checks that it follows the protocol."""
    module = importlib.import_module(module_name)
    missing = [attr for attr in PROTOCOL if not hasattr(module, attr)]
    if missing:
        raise PatchProtocolError(
            f"patch module {module_name!r} lacks {', '.join(missing)}; every patch defines "
            f"{', '.join(PROTOCOL)} (see patches/__init__.py)"
        )
    parse_targets(module.TARGETS, owner=module_name)
    scope = scope_of(module)
    if scope not in SCOPES:
        raise PatchProtocolError(
            f"patch module {module_name!r}: SCOPE={scope!r}; allowed: {', '.join(SCOPES)}"
        )
    return module


def scope_of(module: ModuleType) -> str:
    """The module's ``SCOPE`` (``"any"`` when it sets none)."""
    return getattr(module, "SCOPE", "any")


def current_host() -> str:
    """``"cuda"`` when this process sees a CUDA device, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _host(host: str | None) -> str:
    host = current_host() if host is None else host
    if host not in HOSTS:
        raise ValueError(f"host={host!r}; allowed: {', '.join(HOSTS)}")
    return host


def registered(names: Iterable[str] | None = None) -> list[ModuleType]:
    """The registered patch modules, optionally only those whose ``NAME`` is in ``names``."""
    modules = [load(name) for name in patches.REGISTRY]
    if names is None:
        return modules
    wanted = list(names)
    known = {m.NAME: m for m in modules}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown patch {unknown[0]!r}; registered patches: {', '.join(known)}")
    return [known[n] for n in wanted]


def parse_targets(targets: str, *, owner: str = "patch") -> Requirement:
    """``"megatron-core >=0.16,<0.18"`` -> a requirement (distribution name + version range)."""
    try:
        requirement = Requirement(targets)
    except InvalidRequirement as exc:
        raise PatchProtocolError(
            f"{owner}: TARGETS={targets!r} is not '<distribution> <versions>', e.g. "
            f"'megatron-core >=0.16,<0.18' ({exc})"
        ) from None
    if not str(requirement.specifier):
        raise PatchProtocolError(f"{owner}: TARGETS={targets!r} names no version range")
    return requirement


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PatchStatus:
    """One row of ``megacpp-mcore patches status``."""

    name: str
    module: str
    targets: str
    installed: str | None  # version of the targeted distribution, None when not installed
    in_targets: bool
    check: str
    action: str
    applied: bool | None  # None when the patch cannot tell
    description: str

    scope: str  # a key of SCOPES: the hosts the patch is applied on
    host: str  # the kind of host ("cpu" or "cuda") this status was taken for
    requires: str | None = None

    @property
    def note(self) -> str:
        if self.check == "not-applicable" and self.host not in SCOPES[self.scope]:
            return f"scope {self.scope}: never applied on a {self.host} host"
        if self.check == "not-applicable":
            return f"needs {self.requires}, which is not installed here"
        if self.installed is None:
            return "targeted distribution not installed"
        if self.check == "needed" and not self.in_targets:
            return f"defect still present in {self.installed}: verify, then widen TARGETS"
        return ""


def _check(module: ModuleType) -> str:
    result = module.check()
    if result not in CHECK_RESULTS:
        raise PatchProtocolError(
            f"patch {module.NAME!r}: check() returned {result!r}; allowed: {', '.join(CHECK_RESULTS)}"
        )
    return result


def _in_targets(requirement: Requirement, version: str | None) -> bool:
    if version is None:
        return False
    try:
        return requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def status(names: Iterable[str] | None = None, *, host: str | None = None) -> list[PatchStatus]:
    """Checks every registered patch (or those in ``names``) against the installed versions, for
    ``host`` (``"cpu"`` or ``"cuda"``; default: this process's, :func:`current_host`)."""
    host = _host(host)
    rows = []
    for module in registered(names):
        requirement = parse_targets(module.TARGETS, owner=module.__name__)
        version = installed_version(requirement.name)
        requires = getattr(module, "REQUIRES", None)
        scope = scope_of(module)
        if requires and importlib.util.find_spec(requires.split(".")[0]) is None:
            result = "not-applicable"  # its target lives in an optional package absent here
        elif host not in SCOPES[scope]:
            result = "not-applicable"  # e.g. a CPU shim on a CUDA host: never checked nor applied
        else:
            result = _check(module) if version is not None else "target-missing"
        applied = getattr(module, "applied", None)
        rows.append(PatchStatus(
            name=module.NAME,
            module=module.__name__,
            targets=module.TARGETS,
            installed=version,
            in_targets=_in_targets(requirement, version),
            check=result,
            action=ACTIONS[result],
            applied=applied() if callable(applied) else None,
            description=module.DESCRIPTION,
            requires=requires,
            scope=scope,
            host=host,
        ))
    return rows


def apply_needed(names: Iterable[str] | None = None, *, host: str | None = None) -> dict[str, list[str]]:
    """Applies every patch (or those in ``names``) whose status on ``host`` is ``needed``; returns
    ``{name: what changed}``. The entry point of every entry point (see the module docstring).

    ``host`` is ``"cpu"`` or ``"cuda"`` (default: :func:`current_host`); an entry scoped to
    another kind of host (a CPU shim on a CUDA host) is never applied. Idempotent: a second call
    returns empty lists. Patches that are fixed upstream, whose target is missing or that are not
    applicable here are skipped (their status says why).
    """
    changed: dict[str, list[str]] = {}
    for row in status(names, host=host):
        if row.check != "needed":
            continue
        module = importlib.import_module(row.module)
        result = module.apply()
        if not isinstance(result, list):
            raise PatchProtocolError(f"patch {row.name!r}: apply() returned {result!r}, not a list")
        changed[row.name] = result
    return changed


def format_status(rows: list[PatchStatus]) -> str:
    """The table printed by ``megacpp-mcore patches status``."""
    header = ("patch", "scope", "targets", "installed", "check", "action", "applied")
    table = [header] + [
        (r.name, r.scope, r.targets, r.installed or "-", r.check, r.action,
         {True: "yes", False: "no", None: "?"}[r.applied])
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.name}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "notes:", *notes]
    if rows:
        lines += ["", f"host: {rows[0].host} (scope any: every host; scope cpu: hosts without CUDA)"]
    return "\n".join(lines)

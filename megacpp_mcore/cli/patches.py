"""``megacpp-mcore patches status|apply``: the upgrade check for runtime patches.

``status`` prints, for every entry of the one registry (``megacpp_mcore.patches.REGISTRY``, the CPU
shims included), its scope (``any`` or ``cpu``: hosts without CUDA), the upstream versions it
targets, the installed version, what its check found on this host and the action: keep (defect
present), retire (fixed upstream), re-base (its target moved) or n/a (another kind of host, or an
optional package absent). ``apply`` applies the entries needed on this host in this process
(``registry.apply_needed``, the function every entry point calls) and prints what changed; it is
idempotent (``--twice`` shows a second pass changing nothing). Patches change the running
interpreter only: ``megacpp-mcore train`` and ``python -m megacpp_mcore.launch_pretrain`` apply
them for their own process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="patches_command", required=True, metavar="ACTION")
    st = sub.add_parser("status", help="table of patches: scope, targets, installed version, check, action")
    st.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    st.add_argument("--only", nargs="+", metavar="NAME", help="only these patches")
    ap = sub.add_parser("apply", help="apply the patches needed on this host in this process, print what changed")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these patches")
    ap.add_argument("--twice", action="store_true", help="apply again and show that nothing changes")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from megacpp_mcore.patches import registry

    if args.patches_command == "status":
        rows = registry.status(args.only)
        if args.json:
            print(json.dumps([dataclasses.asdict(r) | {"note": r.note} for r in rows], indent=1))
        else:
            print(registry.format_status(rows))
        return 0
    passes = [registry.apply_needed(args.only)]
    if args.twice:
        passes.append(registry.apply_needed(args.only))
    if args.json:
        print(json.dumps({"passes": passes}, indent=1))
        return 0
    for i, changed in enumerate(passes, 1):
        print(f"pass {i}:" if len(passes) > 1 else "applied:")
        if not changed:
            print("  no patch is needed here")
        for name, what in changed.items():
            print(f"  {name}: " + ("; ".join(what) if what else "already applied, nothing changed"))
    return 0

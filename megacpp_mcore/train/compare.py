"""Run receipts read back side by side, the way the ablation methodology demands.

:func:`resolve` turns command-line arguments into receipt paths, :func:`load` reads one receipt,
:func:`summarize` makes a :class:`RunRow` of it (substrate, identity, validation history, best
bits per byte with its step, final bits per byte, tokens/s, goodput share, INVALID reasons) and
:func:`compare` checks that every row stands on the first row's substrate
(:mod:`megacpp_mcore.train.substrate`). :func:`markdown` and :func:`as_json` format the rows;
:mod:`megacpp_mcore.train.compare_plot` draws them.

A directory argument resolves to its ``receipt.json`` when it has one, else to every receipt
(a ``*.json`` file holding a run receipt's keys) directly inside it, in name order: a runs
directory such as ``<cache>/runs`` gives all its runs, a ``--save`` directory the receipt the run
was told to write there (``train --save DIR --receipt DIR/receipt.json``).

INVALID reasons come from two places: the run's own ``invalid`` list (``[{"rule", "reason",
"step"}]``, recorded where the run could know, e.g. a placement guard overridden) and
:func:`receipt_rules`, the rules judged from the receipt alone (non-finite validation or loss,
no validation at all). An INVALID run shows INVALID and the reasons instead of its numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from megacpp_mcore.train import substrate as sub

RECEIPT_KEYS = ("schema_version", "model", "topology", "training", "validation")
# The receipt schema version this reader understands (the schema file is the one source).
SCHEMA_VERSION = json.loads(Path(__file__).with_name("receipt.schema.json").read_text())[
    "properties"]["schema_version"]["const"]
CHECKPOINT_TRACKER = "latest_checkpointed_iteration.txt"  # what marks a --save directory


class CompareError(ValueError):
    """Bad input to ``compare`` (a path, a receipt, a substrate mismatch): one line, exit 2."""


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CompareError(f"{str(path)!r}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CompareError(f"{str(path)!r}: not valid JSON ({exc})") from None


def _is_receipt(value: Any) -> bool:
    return isinstance(value, dict) and all(k in value for k in RECEIPT_KEYS)


def resolve(arguments: Iterable[str]) -> list[Path]:
    """Receipt paths for ``RUN_OR_RECEIPT`` arguments (files as given; directories as described in
    the module docstring), in argument order, each path once."""
    found: list[Path] = []
    for arg in arguments:
        path = Path(arg)
        if path.is_dir():
            if (path / "receipt.json").is_file():
                found.append(path / "receipt.json")
                continue
            inside = [p for p in sorted(path.glob("*.json"))
                      if not p.name.startswith(".") and p.is_file() and _is_receipt(_read_json(p))]
            if not inside:
                hint = (" (a checkpoint directory: train with --receipt DIR/receipt.json to put "
                        "the run's receipt beside its checkpoints)"
                        if (path / CHECKPOINT_TRACKER).exists() else "")
                raise CompareError(f"{arg!r}: directory holds no run receipt (receipt.json or *.json "
                                   f"receipts){hint}")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise CompareError(f"{arg!r}: not a receipt file or a directory")
        else:
            raise CompareError(f"{arg!r}: no such file or directory")
    if not found:
        raise CompareError("no run given: pass receipt files or directories holding them")
    seen: set[Path] = set()
    unique = []
    for path in found:  # a run named twice (as a file and through its directory) counts once
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def load(path: str | os.PathLike) -> dict[str, Any]:
    """The receipt at ``path``; :class:`CompareError` when it is unreadable, not JSON, not a run
    receipt, or written by a newer schema."""
    path = Path(path)
    value = _read_json(path)
    if not isinstance(value, dict):
        raise CompareError(f"{str(path)!r} is not a run receipt (a JSON {type(value).__name__}, not an object)")
    missing = [k for k in RECEIPT_KEYS if k not in value]
    if missing:
        raise CompareError(f"{str(path)!r} is not a run receipt (no {', '.join(map(repr, missing))})")
    not_objects = [k for k in RECEIPT_KEYS[1:] if not isinstance(value[k], dict)]
    if not_objects:
        raise CompareError(f"{str(path)!r} is not a run receipt ({', '.join(map(repr, not_objects))} "
                           "not a JSON object)")
    version = value["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise CompareError(f"{str(path)!r}: receipt schema_version {version!r}; this megacpp-mcore reads "
                           f"1..{SCHEMA_VERSION}")
    history = value["validation"].get("history")
    if not isinstance(history, list) or not all(isinstance(h, dict) and _is_int(h.get("step")) for h in history):
        raise CompareError(f"{str(path)!r} is not a run receipt (validation.history is not a list of "
                           "{step, bpb} objects)")
    invalid = value.get("invalid", [])
    if not isinstance(invalid, list) or not all(
            isinstance(e, dict) and isinstance(e.get("rule"), str) and isinstance(e.get("reason"), str)
            for e in invalid):
        raise CompareError(f"{str(path)!r}: 'invalid' must be a list of {{rule, reason, step}} objects")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """A real number that is not NaN/inf (receipts write NaN/inf as ``null``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def receipt_rules(receipt: Mapping[str, Any]) -> list[dict[str, Any]]:
    """INVALID reasons judged from the receipt alone: ``nonfinite_validation``,
    ``nonfinite_steps`` (loss or gradient norm of a logged step, or the final loss) and
    ``no_validation``."""
    found = []
    history = receipt["validation"]["history"]
    bad = [h["step"] for h in history if not _finite(h.get("bpb"))]
    if bad:
        found.append({"rule": "nonfinite_validation", "step": bad[0],
                      "reason": f"validation bits/byte is NaN/inf at {len(bad)} of {len(history)} "
                                f"evaluations (first at step {bad[0]})"})
    training = receipt["training"]
    losses = [e for e in training.get("losses") or [] if isinstance(e, dict)]
    bad = [e.get("step") for e in losses
           if not _finite(e.get("loss")) or ("grad_norm" in e and not _finite(e["grad_norm"]))]
    if bad:
        found.append({"rule": "nonfinite_steps", "step": bad[0],
                      "reason": f"training loss or gradient norm is NaN/inf at {len(bad)} of "
                                f"{len(losses)} logged steps (first at step {bad[0]})"})
    elif training.get("completed_steps") and not _finite(training.get("final_loss")):
        found.append({"rule": "nonfinite_steps", "step": training["completed_steps"],
                      "reason": f"final training loss is NaN/inf (step {training['completed_steps']})"})
    if not history:
        found.append({"rule": "no_validation", "step": None,
                      "reason": "the run recorded no validation evaluation"})
    return found


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunRow:
    """One compared run: what it stands on, what it is, and what it measured."""

    label: str
    path: str
    substrate: dict[str, Any]
    identity: dict[str, Any]
    steps: list[int]  # validation history, one entry per evaluation
    tokens: list[int | None]  # training tokens consumed at each evaluation
    bpb: list[float | None]  # None where the value was NaN/inf
    best_bpb: float | None
    best_step: int | None
    best_tokens: int | None
    final_bpb: float | None
    final_step: int | None
    tokens_per_s: float | None
    goodput_share: float | None  # goodput seconds / total wall seconds
    status: str
    completed_steps: int | None
    invalid: list[dict[str, Any]]
    stats_history: list[dict[str, Any]]
    differs: list[str] = dataclasses.field(default_factory=list)  # vs the first row's substrate

    @property
    def valid(self) -> bool:
        return not self.invalid


def summarize(path: str | os.PathLike, receipt: Mapping[str, Any], *, label: str) -> RunRow:
    """The :class:`RunRow` of a loaded receipt. The best evaluation is the lowest finite bits per
    byte (the earliest on a tie); the final one is the last evaluation."""
    topo = receipt["topology"]
    tokens_per_step = (topo["global_batch_size"] * topo["seq_length"]
                       if _is_int(topo.get("global_batch_size")) and _is_int(topo.get("seq_length")) else None)
    history = receipt["validation"]["history"]
    steps = [h["step"] for h in history]
    # Receipts since the eval history carried tokens record them; older ones: step x batch tokens.
    tokens = [h["tokens"] if _is_int(h.get("tokens")) else
              (h["step"] * tokens_per_step if tokens_per_step else None) for h in history]
    bpb = [float(h["bpb"]) if _finite(h.get("bpb")) else None for h in history]
    scored = [(v, s, t) for v, s, t in zip(bpb, steps, tokens) if v is not None]
    best = min(scored, key=lambda e: (e[0], e[1])) if scored else (None, None, None)
    recorded = [dict(e, step=e.get("step")) for e in receipt.get("invalid", [])]
    judged = [e for e in receipt_rules(receipt) if e["rule"] not in {r["rule"] for r in recorded}]
    time_ = receipt.get("time") or {}
    total = time_.get("total_s")
    training = receipt["training"]
    stats = receipt.get("stats") or {}
    return RunRow(
        label=label, path=str(path), substrate=sub.substrate(receipt), identity=sub.identity(receipt),
        steps=steps, tokens=tokens, bpb=bpb, best_bpb=best[0], best_step=best[1], best_tokens=best[2],
        final_bpb=bpb[-1] if bpb else None, final_step=steps[-1] if steps else None,
        tokens_per_s=(receipt.get("throughput") or {}).get("tokens_per_s"),
        goodput_share=(time_["goodput_s"] / total if _finite(time_.get("goodput_s")) and _finite(total)
                       and total > 0 else None),
        status=str(receipt.get("status", "unknown")), completed_steps=training.get("completed_steps"),
        invalid=recorded + judged, stats_history=list(stats.get("history") or []))


def _labels(paths: list[Path]) -> list[str]:
    """File stems (a run directory's ``receipt.json``: the directory's name); where two collide,
    ``parent/stem``; where those collide too, numbered."""
    stems = [p.parent.name if p.name == "receipt.json" else p.stem for p in paths]
    labels = [f"{p.parent.name}/{stem}" if stems.count(stem) > 1 else stem for p, stem in zip(paths, stems)]
    return [f"{lab}#{i + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def compare(paths: list[Path], *, allow_substrate_mismatch: bool = False) -> list[RunRow]:
    """Rows for ``paths`` (loaded and summarised). A run on another substrate than the first is
    refused (:class:`CompareError` naming the differing fields) unless
    ``allow_substrate_mismatch``, which records the differences in its row's ``differs``."""
    receipts = [load(p) for p in paths]
    rows = [summarize(p, r, label=lab) for p, r, lab in zip(paths, receipts, _labels(paths))]
    first = rows[0]
    rows = [first] + [dataclasses.replace(r, differs=sub.differences(first.substrate, r.substrate))
                      for r in rows[1:]]
    other = [r for r in rows if r.differs]
    if other and not allow_substrate_mismatch:
        raise CompareError(
            f"run(s) on another substrate than the first ({first.label}): "
            + "; ".join(f"{r.label}: {', '.join(r.differs)}" for r in other)
            + "; pass --allow-substrate-mismatch to show them labelled")
    return rows


# ---------------------------------------------------------------------------------- formatting --

def verdict(row: RunRow) -> str:
    """``ok``, ``stopped at step N of M``, ``INVALID: rule: reason; ...`` and/or ``other substrate
    (...)``: everything that qualifies the row's numbers."""
    parts = []
    if row.invalid:
        parts.append("INVALID: " + "; ".join(f"{e['rule']}: {e['reason']}" for e in row.invalid))
    if row.differs:
        parts.append(f"other substrate ({', '.join(row.differs)})")
    if row.status != "completed":
        parts.append(f"{row.status} at step {row.completed_steps} of {row.substrate['steps']}")
    return "; ".join(parts) or "ok"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


def _bpb(row: RunRow, value: float | None, step: int | None) -> str:
    if row.invalid:
        return "INVALID"
    return "-" if value is None else f"{value:.4f} (step {step})"


SUBSTRATE_HEADERS = {"data": "data", "tokenizer": "tokenizer", "depth": "depth", "width": "width",
                     "context": "context", "global_batch": "global batch", "steps": "steps",
                     "topology": "topology"}
IDENTITY_HEADERS = {"pattern": "pattern", "layer_table": "layer table", "lr": "peak lr",
                    "kernels": "kernels", "megacpp_mcore": "megacpp-mcore", "megatron_core": "megatron-core"}


def markdown(rows: list[RunRow]) -> str:
    """Two Markdown tables: each run's substrate and identity (a cell that differs from the first
    run's substrate is marked ``≠``), then its results (bits per byte, throughput, verdict)."""
    first = rows[0].substrate

    def mark(row: RunRow, key: str) -> str:
        return ("≠ " if row.substrate[key] != first[key] else "") + _cell(row.substrate[key])

    head = ["run", *SUBSTRATE_HEADERS.values(), *IDENTITY_HEADERS.values()]
    lines = ["Substrate (≠: differs from the first run's)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, *(mark(r, k) for k in SUBSTRATE_HEADERS),
                 *(_cell(r.identity[k]) for k in IDENTITY_HEADERS)]
        lines.append("| " + " | ".join(_cell(c) if i == 0 else c for i, c in enumerate(cells)) + " |")
    head = ["run", "best bpb (step)", "final bpb (step)", "tokens/s", "goodput", "verdict"]
    lines += ["", "Validation bits per byte (lower is better)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, _bpb(r, r.best_bpb, r.best_step), _bpb(r, r.final_bpb, r.final_step),
                 "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}",
                 "-" if r.goodput_share is None else f"{100 * r.goodput_share:.0f}%", verdict(r)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def as_json(rows: list[RunRow], png: str | None) -> dict[str, Any]:
    """The comparison as one JSON object (``--json``): every row's fields (numbers kept also for
    INVALID rows, next to their reasons), its verdict, and the PNG path."""
    runs = []
    for r in rows:
        item = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name != "stats_history"}
        runs.append(item | {"valid": r.valid, "verdict": verdict(r)})
    return {"substrate_fields": list(sub.SUBSTRATE_FIELDS), "runs": runs, "png": png}


def default_png(first_receipt: Path, cwd: Path | None = None) -> Path:
    """``<first receipt's stem>.compare.png`` beside it, or in ``cwd`` where that directory is not
    writable."""
    name = f"{first_receipt.stem}.compare.png"
    folder = first_receipt.parent
    return folder / name if os.access(folder, os.W_OK) else (cwd or Path.cwd()) / name


def check_png_path(path: Path) -> Path:
    """``path`` if a PNG can be written there; :class:`CompareError` naming why not."""
    if path.is_dir():
        raise CompareError(f"--png {str(path)!r} is a directory; give a file path such as "
                           f"{str(path / 'compare.png')!r}")
    if not path.parent.is_dir():
        raise CompareError(f"--png {str(path)!r}: directory {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise CompareError(f"--png {str(path)!r}: directory {str(path.parent)!r} is not writable")
    return path

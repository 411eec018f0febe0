"""A checkpoint of ``megacpp-mcore train --save DIR`` as an inference model.

The checkpoint records the model signature (:func:`megacpp_mcore.train.checkpoint.model_signature`:
pattern, depth, widths, vocabulary, MoE, the per-layer symbols and features), the trained MTP depth
(``train --mtp-depth``; the shared block's weights do not show it) and, in its completion marker,
the run's sequence length. :func:`resolve_model` finds the
:class:`~megacpp_mcore.models.presets.ModelConfig` it was trained with (the preset, or a
``--pattern/--num-layers`` model on a preset's dimensions) or checks the one the caller names;
:func:`load_model` builds that model through the package's one builder and loads only the model
weights (no optimizer), through Megatron's distributed checkpointing.

A checkpoint of Megatron-LM's ``pretrain_gpt.py`` run with one of our ``layer_specs`` objects (the
launcher, the recipes) loads the same way; its model, settings and tokenizer come from the run's
arguments (:mod:`megacpp_mcore.infer.megatron_lm`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megacpp_mcore.infer import megatron_lm
from megacpp_mcore.models.presets import PRESETS, ModelConfig, custom_model
from megacpp_mcore.train.checkpoint import (
    check_checkpoint_matches,
    find_checkpoint,
    model_signature,
    read_added_features,
    read_metadata,
)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint: its directory, step, recorded model signature, the sequence
    length and MTP depth it was trained at (None where it does not say: then the preset's);
    ``args``: the parsed arguments of the ``pretrain_gpt.py`` run that wrote it (None for
    ``megacpp-mcore train``'s, which carry a signature instead)."""

    path: Path
    step: int
    signature: dict
    seq_length: int | None = None
    mtp_depth: int | None = None
    args: Any = None
    added: dict = dataclasses.field(default_factory=dict)  # fine-tune features (FlexiDepth) and configs
    frozen_backbone: bool = False  # written by a --freeze-backbone fine-tune (no bearing on inference)


def open_checkpoint(directory: str) -> Checkpoint:
    """The newest complete checkpoint in ``directory`` (as ``train --load`` finds it: partial saves
    are ignored); ``ValueError`` (one line) when there is none, when it cannot be read or when it
    was not written by ``megacpp-mcore train`` (no model signature)."""
    path, step = find_checkpoint(directory)
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as exc:  # unreadable common state: a broken or foreign checkpoint
        raise ValueError(f"--load {directory!r}: {path} cannot be read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if megatron_lm.is_megatron_lm(common):
        args = common["args"]
        return Checkpoint(path=path, step=step, signature={}, seq_length=getattr(args, "seq_length", None),
                          mtp_depth=int(getattr(args, "megacpp_mtp_depth", 0) or 0), args=args)
    signature = common.get("model_signature") if isinstance(common, dict) else None
    if signature is None:
        raise ValueError(f"--load {directory!r}: {path} was written neither by `megacpp-mcore train` "
                         "(no model signature) nor by Megatron-LM's pretrain_gpt.py (no arguments)")
    run = (read_metadata(path) or {}).get("run") or {}
    try:
        added = read_added_features(common.get("added_features"))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--load {directory!r}: {path}: {exc}") from None
    return Checkpoint(path=path, step=step, signature=signature, seq_length=run.get("seq_length"),
                      mtp_depth=common.get("mtp_depth"), added=added,
                      frozen_backbone=bool(common.get("frozen_backbone", False)))


def _preset_shapes(signature: dict):
    """Presets as they are, then each preset's dimensions under the recorded pattern/depth."""
    for name, preset in PRESETS.items():
        yield preset
        if (preset.pattern, preset.num_layers) != (signature.get("pattern"), signature.get("num_layers")):
            try:
                yield custom_model(pattern=signature["pattern"], num_layers=signature["num_layers"],
                                   base=name)
            except (ValueError, KeyError):
                continue


def _candidates(signature: dict):
    """:func:`_preset_shapes`, each also with the recorded vocabulary (a run on BPE data sizes the
    embedding to its tokenizer, see ``train.tokenizer.fit_model_vocab``)."""
    vocab = signature.get("vocab_size")
    for model in _preset_shapes(signature):
        yield model
        if isinstance(vocab, int) and vocab != model.vocab_size:
            yield model.replace(vocab_size=vocab)


def _with_added(model: ModelConfig, added: dict) -> ModelConfig | None:
    """``model`` with the features a fine-tune added (FlexiDepth, as configured then), named as
    ``train`` names it; None where they cannot sit on it."""
    if not added:
        return model
    try:
        return model.replace(name=model.name + "".join(f"+{name}" for name in added),
                             features={**model.features, **added})
    except ValueError:
        return None


def resolve_model(checkpoint: Checkpoint, model: ModelConfig | None = None,
                  seq_length: int | None = None) -> ModelConfig:
    """The model ``checkpoint`` holds: ``model`` when given (checked against the signature), else
    the first preset-based model whose signature matches, with the MTP depth it was trained at.
    The context is ``seq_length`` when given, else the length the run trained at
    (``train --seq-length``), else the preset's."""
    if checkpoint.args is not None:
        return _resolve_megatron_lm(checkpoint, model, seq_length)
    named = model is not None
    if named:
        model = _with_added(model, checkpoint.added) or model
    else:
        model = next((m for c in _candidates(checkpoint.signature)
                      for m in [_with_added(c, checkpoint.added)]
                      if m is not None and model_signature(m) == checkpoint.signature), None)
        if model is None:
            sig = checkpoint.signature
            raise ValueError(
                f"--load: {checkpoint.path} holds a model of no known preset (pattern "
                f"{sig.get('pattern')!r}, {sig.get('num_layers')} layers, hidden "
                f"{sig.get('hidden_size')}); name it with --preset/--pattern/--num-layers")
    if checkpoint.mtp_depth is not None:
        model = model.replace(mtp_depth=checkpoint.mtp_depth)
    if named:
        check_checkpoint_matches(checkpoint.path, model, frozen_backbone=checkpoint.frozen_backbone)
    seq_length = seq_length or checkpoint.seq_length
    if seq_length is not None and seq_length != model.seq_length:
        model = model.replace(seq_length=seq_length)
    return model


def _resolve_megatron_lm(checkpoint: Checkpoint, named: ModelConfig | None,
                         seq_length: int | None) -> ModelConfig:
    """The model of a ``pretrain_gpt.py`` checkpoint, from its arguments (``named``, when given,
    must be that model); its flags are checked against what the package builds."""
    from megacpp_mcore.train import runtime

    where = str(checkpoint.path)
    model = megatron_lm.model_from_args(checkpoint.args, where)
    if named is not None and model_signature(named) != model_signature(model):
        raise ValueError(f"--load: {where} holds {model.name} (pattern {model.pattern!r}, "
                         f"{model.num_layers} layers, hidden {model.hidden_size}), not {named.name}; "
                         "leave out --preset/--pattern/--num-layers for a pretrain_gpt.py checkpoint")
    if seq_length is not None:
        model = model.replace(seq_length=seq_length)
    config = runtime.transformer_config(model, runtime.Parallelism(), bf16=False,
                                        **megatron_lm.config_overrides(checkpoint.args, model))
    megatron_lm.check_args(checkpoint.args, config, where)
    return model


def tokenizer(checkpoint: Checkpoint):
    """What the checkpoint's ids mean: a ``train`` run's tokenizer (bytes, or the BPE a run on BPE
    data copied beside its checkpoints), or the one a ``pretrain_gpt.py`` run was given."""
    from megacpp_mcore.train.tokenizer import for_checkpoint

    if checkpoint.args is not None:
        return megatron_lm.tokenizer_from_args(checkpoint.args, str(checkpoint.path))
    return for_checkpoint(checkpoint.path.parent)


def load_model(checkpoint: Checkpoint, model: ModelConfig, *, backend: str = "auto",
               bf16: bool | None = None):
    """Builds ``model`` (single process: starts the 1-rank world through ``runtime.initialize``)
    and loads the checkpoint's model weights. Returns the GPTModel (eval mode)."""
    from megatron.core import dist_checkpointing

    from megacpp_mcore.train import runtime

    par = runtime.Parallelism()
    runtime.initialize(par)
    overrides = megatron_lm.config_overrides(checkpoint.args, model) if checkpoint.args is not None else {}
    config = runtime.transformer_config(model, par, bf16=bf16, **overrides)
    (gpt,) = runtime.build_model(model, config, backend=backend, wrap_ddp=False)
    try:
        loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict(prefix="")},
                                         str(checkpoint.path))
    except Exception as exc:
        raise ValueError(f"--load: the weights in {checkpoint.path} cannot be read into "
                         f"{model.name} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    own = gpt.state_dict(keep_vars=True)
    missing, _ = gpt.load_state_dict({k: v for k, v in loaded["model"].items() if k in own},
                                     strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise ValueError(f"--load: {checkpoint.path} lacks weights {missing[:3]}")
    return gpt.eval()

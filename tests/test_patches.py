"""patches/: protocol, status on the installed megatron-core (CPU shims included, with their scope),
idempotent apply, simulated upstream fixes and missing targets, what each patch actually changes,
and that every entry point applies the one registry (and importing applies nothing)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from packaging.version import Version

import megacpp_mcore.patches as patches
from megacpp_mcore.patches import registry, spec_import_errors, tp_attributes_without_init
from megacpp_mcore.patches._wrapping import upstream
from megacpp_mcore.spec.compat import mcore_version

CPU_SHIMS = {"cpu-device-redirect", "cpu-rng-tracker", "cpu-clip-grads", "cpu-block-norm",
             "cpu-moe-router-gemm", "cpu-tied-embedding-copy"}

# The megatron-core release whose code no longer has the defect (None: still present at 0.19.2).
# Read from each wheel (0.16.1, 0.17.1, 0.18.2, 0.19.2); the tests assert the verdict the
# INSTALLED wheel must give, so the 0.16.1 leg and the 0.19.2 leg of CI check both sides.
FIXED_IN = {
    "spec-import-errors": None,
    "tp-attributes-without-init": "0.18",
    "mla-have-te": "0.17",
    "mla-down-proj-tp-marker": "0.17",  # TELinear marks duplicated params from core_v0.17.0
    "cpu-device-redirect": None, "cpu-rng-tracker": None, "cpu-clip-grads": None,
    "cpu-block-norm": None, "cpu-tied-embedding-copy": None,
    "cpu-moe-router-gemm": "0.17",  # the no-TE branch assigns te_general_gemm = None from 0.17
    "float16-optimizer-fp32-params": None,
}


def expected_check(name: str) -> str:
    """What ``check()`` must answer for patch ``name`` on the installed megatron-core."""
    fixed = FIXED_IN[name]
    return "fixed-upstream" if fixed and mcore_version() >= Version(fixed) else "needed"


def needed_here(*names: str) -> list[str]:
    return [n for n in names if expected_check(n) == "needed"]


@pytest.fixture
def restore_targets(monkeypatch):
    """Every upstream attribute a patch may replace is restored after the test."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import spec_utils

    # Start from upstream's own code even if an earlier test in this process (e.g. the launcher's)
    # applied the patches; everything is put back as it was afterwards.
    monkeypatch.setattr(spec_utils, "import_module",
                        upstream(spec_utils.import_module, spec_import_errors.NAME))
    for cls_name in tp_attributes_without_init.PARTITION_DIM:
        cls = getattr(layers, cls_name)
        monkeypatch.setattr(cls, "__init__",
                            upstream(cls.__dict__["__init__"], tp_attributes_without_init.NAME))
    return monkeypatch


def _rows():
    return {row.name: row for row in registry.status()}


def test_registry_modules_follow_the_protocol():
    modules = registry.registered()
    assert [m.__name__ for m in modules] == list(patches.REGISTRY)
    names = [m.NAME for m in modules]
    assert len(set(names)) == len(names)
    for module in modules:
        assert module.DESCRIPTION.strip()
        assert registry.parse_targets(module.TARGETS).name in ("megatron-core", "transformer-engine",
                                                                "mamba-ssm")


def test_status_on_installed_megatron_core(restore_targets):
    """Each verdict as read from the installed wheel (FIXED_IN); TARGETS agree with it: a needed
    patch is in its TARGETS, a fixed one is past them, so no row asks to widen TARGETS."""
    import megatron.core

    rows = {row.name: row for row in registry.status(host="cpu")}
    assert set(rows) >= set(FIXED_IN) | {"te-attention-backend-per-layer"}
    assert {name for name, row in rows.items() if row.scope == "cpu"} == CPU_SHIMS
    te = registry.importlib.util.find_spec("transformer_engine") is not None
    for name in FIXED_IN:
        row, expected = rows[name], expected_check(name)
        if name == "mla-down-proj-tp-marker" and not te:
            # TELinear lives in Transformer Engine: nothing to apply (or re-base) without it
            assert (row.check, row.action) == ("not-applicable", "n/a")
            assert row.note == "needs transformer_engine, which is not installed here"
            continue
        assert (row.installed, row.check, row.action) == (
            Version(megatron.core.__version__).public, expected, {"needed": "keep", "fixed-upstream": "retire"}[expected]), name
        assert row.in_targets == (expected == "needed"), f"{name}: TARGETS {row.targets}"
        assert row.note == "", (name, row.note)
    for name in ("spec-import-errors", "tp-attributes-without-init"):  # restore_targets undid them
        assert rows[name].applied is False
    if not te:
        assert rows["te-attention-backend-per-layer"].check == "not-applicable"


def test_down_proj_marker_check_reads_the_installed_source():
    """``mla-down-proj-tp-marker``'s check reads ``TELinear.__init__`` from the installed module's
    file: the verdict holds on a host without Transformer Engine (there it is never applied)."""
    from megacpp_mcore.patches import mla_down_proj_tp_marker

    assert mla_down_proj_tp_marker.check() == expected_check("mla-down-proj-tp-marker")
    if registry.importlib.util.find_spec("transformer_engine") is None:
        assert mla_down_proj_tp_marker.apply() == [] and mla_down_proj_tp_marker.applied() is None


def test_apply_twice_equals_once(restore_targets):
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import spec_utils

    original_import = spec_utils.import_module
    first = registry.apply_needed()
    rows = _rows()
    assert set(first) == {name for name, row in rows.items() if row.check == "needed"}
    assert first["spec-import-errors"] == ["megatron.core.transformer.spec_utils.import_module"]
    tp = "tp-attributes-without-init"
    assert len(first[tp]) == 3 if expected_check(tp) == "needed" else tp not in first  # fixed 0.18
    state = (spec_utils.import_module, layers.RowParallelLinear.__init__)
    assert registry.apply_needed() == {name: [] for name in first}
    assert (spec_utils.import_module, layers.RowParallelLinear.__init__) == state
    assert spec_utils.import_module.__wrapped__ is original_import  # wrapped once, not twice
    rows = _rows()
    assert all(rows[name].applied for name in first if rows[name].applied is not None)
    assert all(not rows[name].applied for name in rows if name not in first)  # retired: never applied


def test_check_probes_upstream_behind_the_patch(restore_targets):
    registry.apply_needed()
    assert spec_import_errors.check() == "needed"
    assert tp_attributes_without_init.check() == expected_check("tp-attributes-without-init")


def test_spec_import_errors_name_the_cause(restore_targets):
    from megatron.core.transformer import spec_utils

    original = spec_utils.import_module
    assert original(("megacpp_no_such_module", "SPEC")) is None  # the upstream defect
    holder = types.ModuleType("megacpp_fake_builder")  # imported `import_module` by name
    holder.import_module = original
    restore_targets.setitem(sys.modules, "megacpp_fake_builder", holder)

    changed = spec_import_errors.apply()
    assert "megacpp_fake_builder.import_module" in changed
    assert holder.import_module is spec_utils.import_module is not original
    with pytest.raises(ImportError, match="cannot import module 'megacpp_no_such_module'"):
        spec_utils.import_module(("megacpp_no_such_module", "SPEC"))
    with pytest.raises(ImportError, match=r"has no attribute 'NOPE'; it defines: .*FeaturePlacement"):
        spec_utils.import_module(("megacpp_mcore.spec.pattern", "NOPE"))
    with pytest.raises(ValueError, match="two words, MODULE ATTR"):
        spec_utils.import_module(["layer_specs.nam56r"])
    from megacpp_mcore.spec.pattern import SYMBOLS

    assert spec_utils.import_module(["megacpp_mcore.spec.pattern", "SYMBOLS"]) is SYMBOLS


def test_simulated_upstream_fix_retires_spec_patch(restore_targets):
    from megatron.core.transformer import spec_utils

    def fixed_import_module(module_path):  # upstream raising instead of returning None
        base, name = module_path
        return getattr(__import__(base, fromlist=[name]), name)

    restore_targets.setattr(spec_utils, "import_module", fixed_import_module)
    assert spec_import_errors.check() == "fixed-upstream"
    row = _rows()["spec-import-errors"]
    assert (row.check, row.action) == ("fixed-upstream", "retire")
    assert "spec-import-errors" not in registry.apply_needed()
    assert spec_utils.import_module is fixed_import_module


def test_simulated_upstream_fix_retires_tp_patch(restore_targets):
    """megatron-core 0.18 sets the markers without initialisation; simulate that."""
    from megatron.core.tensor_parallel import layers

    for cls_name, dim in tp_attributes_without_init.PARTITION_DIM.items():
        cls = getattr(layers, cls_name)
        original = cls.__init__

        def fixed_init(self, *args, _original=original, _dim=dim, **kwargs):
            _original(self, *args, **kwargs)
            if not hasattr(self.weight, "tensor_model_parallel"):
                layers.set_tensor_model_parallel_attributes(self.weight, True, _dim, 1)

        restore_targets.setattr(cls, "__init__", fixed_init)
    assert tp_attributes_without_init.check() == "fixed-upstream"
    assert _rows()["tp-attributes-without-init"].action == "retire"


def test_missing_target_says_re_base(restore_targets):
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import spec_utils

    restore_targets.delattr(spec_utils, "import_module")
    restore_targets.delattr(layers, "RowParallelLinear")
    rows = _rows()
    for name in ("spec-import-errors", "tp-attributes-without-init"):
        assert (rows[name].check, rows[name].action) == ("target-missing", "re-base")
    applied = registry.apply_needed()
    assert "spec-import-errors" not in applied and "tp-attributes-without-init" not in applied
    assert spec_import_errors.apply() == [] and tp_attributes_without_init.apply() == []


def test_changed_constructor_signature_says_re_base(restore_targets):
    from megatron.core.tensor_parallel import layers

    def renamed_kwargs(self, input_size, output_size, *, cfg, init_fn):  # a future refactor
        torch.nn.Module.__init__(self)

    restore_targets.setattr(layers.ColumnParallelLinear, "__init__", renamed_kwargs)
    assert tp_attributes_without_init.check() == "target-missing"


def test_installed_version_outside_targets_is_noted(restore_targets):
    restore_targets.setattr(registry, "installed_version", lambda dist: "0.20.0")
    row = _rows()["spec-import-errors"]
    assert (row.in_targets, row.check) == (False, "needed")  # the defect is still installed
    assert "widen TARGETS" in row.note
    restore_targets.setattr(registry, "installed_version", lambda dist: None)
    row = _rows()["spec-import-errors"]
    assert (row.check, row.action, row.note) == ("target-missing", "re-base",
                                                  "targeted distribution not installed")


def _tp_layers(config, stride=2):
    from megatron.core.tensor_parallel import layers

    init = torch.nn.init.zeros_
    return [
        layers.ColumnParallelLinear(8, 8, config=config, init_method=init, bias=False, stride=stride),
        layers.RowParallelLinear(8, 8, config=config, init_method=init, bias=False,
                                 input_is_parallel=True, skip_bias_add=False, stride=stride),
        layers.VocabParallelEmbedding(8, 8, config=config, init_method=init),
    ]


def _markers(layer):
    return tuple(getattr(layer.weight, a, None)
                 for a in ("tensor_model_parallel", "partition_dim", "partition_stride"))


def test_tp_markers_match_initialised_layers(restore_targets):
    from megatron.core.model_parallel_config import ModelParallelConfig

    def build(perform_initialization):
        config = ModelParallelConfig(perform_initialization=perform_initialization,
                                     use_cpu_initialization=True)
        return [_markers(layer) for layer in _tp_layers(config)]

    expected = build(True)
    assert expected == [(True, 0, 2), (True, 1, 2), (True, 0, 1)]
    if expected_check("tp-attributes-without-init") == "fixed-upstream":  # megatron-core >= 0.18
        assert build(False) == expected  # upstream sets the markers itself: the patch retires
        return
    assert build(False) == [(None, None, None)] * 3  # the upstream defect (0.16, 0.17)
    tp_attributes_without_init.apply()
    assert build(False) == expected
    assert build(True) == expected  # initialised layers are left as upstream made them


def test_protocol_violations_are_refused(restore_targets):
    bad = types.ModuleType("megacpp_bad_patch")
    bad.NAME, bad.TARGETS, bad.DESCRIPTION = "bad", "megatron-core >=0.16", "x"
    restore_targets.setitem(sys.modules, "megacpp_bad_patch", bad)
    with pytest.raises(registry.PatchProtocolError, match="lacks check, apply"):
        registry.load("megacpp_bad_patch")
    bad.check, bad.apply = (lambda: "maybe"), (lambda: [])
    restore_targets.setattr(patches, "REGISTRY", ("megacpp_bad_patch",))
    with pytest.raises(registry.PatchProtocolError, match="returned 'maybe'; allowed: needed"):
        registry.status()
    with pytest.raises(registry.PatchProtocolError, match="not '<distribution> <versions>'"):
        registry.parse_targets("megatron-core 0.16")
    with pytest.raises(registry.PatchProtocolError, match="names no version range"):
        registry.parse_targets("megatron-core")
    bad.SCOPE = "gpu"
    with pytest.raises(registry.PatchProtocolError, match="SCOPE='gpu'; allowed: any, cpu"):
        registry.load("megacpp_bad_patch")
    with pytest.raises(ValueError, match="host='tpu'; allowed: cpu, cuda"):
        registry.apply_needed(host="tpu")


def test_status_lists_cpu_shims_with_their_scope():
    """The CPU status can be taken on any host (the checks only read upstream's code)."""
    on_cpu = {r.name: r for r in registry.status(host="cpu")}
    on_cuda = {r.name: r for r in registry.status(host="cuda")}
    for name in CPU_SHIMS:
        assert (on_cpu[name].scope, on_cpu[name].check) == ("cpu", expected_check(name))
        assert (on_cuda[name].check, on_cuda[name].action) == ("not-applicable", "n/a")
        assert on_cuda[name].note == "scope cpu: never applied on a cuda host"
    for name in ("spec-import-errors", "tp-attributes-without-init"):  # scope any: same on both
        assert on_cpu[name].scope == on_cuda[name].scope == "any"
        assert on_cpu[name].check == on_cuda[name].check == expected_check(name)
    table = registry.format_status(list(on_cuda.values()))
    assert table.splitlines()[0].split()[:3] == ["patch", "scope", "targets"]
    assert "cpu-device-redirect: scope cpu: never applied on a cuda host" in table
    assert "host: cuda" in table


def test_cli_status_and_apply(restore_targets, capsys):
    from megacpp_mcore import cli

    assert cli.main(["patches", "status"]) == 0
    out = capsys.readouterr().out
    assert "spec-import-errors" in out and "tp-attributes-without-init" in out
    for name in FIXED_IN:  # the table says each patch's verdict for the installed wheel
        row = next(r for r in registry.status([name]))
        assert re.search(rf"^{name}\s.*\s{row.check}\s+{row.action}\s", out, re.M), (name, out)
        if row.check != "not-applicable":
            assert row.check == expected_check(name)
    assert cli.main(["patches", "apply", "--twice", "--json"]) == 0
    passes = json.loads(capsys.readouterr().out)["passes"]
    ours = needed_here("spec-import-errors", "tp-attributes-without-init")
    assert all(passes[0][n] for n in ours) and not any(passes[1].values())
    assert cli.main(["patches", "status", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    applied = {r["name"]: r["applied"] for r in listed}
    assert all(applied[n] for n in ours)
    assert {r["name"] for r in listed if r["scope"] == "cpu"} == CPU_SHIMS
    assert {r["host"] for r in listed} == {registry.current_host()}
    assert cli.main(["patches", "status"]) == 0
    table = capsys.readouterr().out
    for name in CPU_SHIMS:
        assert re.search(rf"^{name}\s+cpu\s+megatron-core ", table, re.M), table
    assert cli.main(["patches", "status", "--only", "no-such-patch"]) == 2
    assert "unknown patch 'no-such-patch'" in capsys.readouterr().err


def tp_grad_norms() -> dict[str, float]:
    """Rank worker (TP=2): grad norm of one step from identical weights, for a model built with
    initialisation (reference), without it (upstream defect), and without it after the patch."""
    from megacpp_mcore.train import runtime
    from megacpp_mcore.testing.parity import model_from_spec, synthetic_batches

    from megatron.core.tensor_parallel import layers

    par = runtime.Parallelism(tp=2)
    runtime.initialize(par, seed=1234)
    assert tp_attributes_without_init.applied()  # the entry point applied the registry
    model = model_from_spec({"pattern": "AE", "num_layers": 2, "hidden_size": 64,
                             "num_attention_heads": 4, "ffn_hidden_size": 128, "vocab_size": 128,
                             "seq_length": 16, "moe": None})
    norms, weights = {}, None
    for name, perform_init in (("initialised", True), ("unpatched", False), ("patched", False)):
        if name == "unpatched":  # upstream's constructors back, to show the defect
            for cls_name in tp_attributes_without_init.PARTITION_DIM:
                cls = getattr(layers, cls_name)
                cls.__init__ = upstream(cls.__dict__["__init__"], tp_attributes_without_init.NAME)
        if name == "patched":
            tp_attributes_without_init.apply()
        config = runtime.transformer_config(model, par, perform_initialization=perform_init)
        chunks = runtime.build_model(model, config, backend="local")
        params = dict(chunks[0].module.named_parameters())
        if weights is None:
            weights = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(weights[k])
        optimizer = runtime.build_optimizer(chunks, lr=0.0)
        batches = synthetic_batches(seed=7, step=0, global_batch=2, seq_length=model.seq_length,
                                    vocab=model.vocab_size, dp_rank=0, dp=1, micro_batch_size=1)
        norms[name] = runtime.train_step(chunks, optimizer, iter(batches), num_microbatches=2,
                                         micro_batch_size=1, seq_length=model.seq_length)["grad_norm"]
    runtime.shutdown()
    return norms


@pytest.mark.distributed
@pytest.mark.skipif(expected_check("tp-attributes-without-init") == "fixed-upstream",
                    reason="megatron-core >= 0.18 sets the TP markers itself (test_tp_markers_match_"
                           "initialised_layers shows it); the 0.16.1 leg runs this")
def test_tp2_grad_norm_without_initialization_is_fixed_by_the_patch():
    from megacpp_mcore.testing.dist import run_distributed

    ranks = run_distributed("tests.test_patches:tp_grad_norms", nproc=2)
    assert ranks[0] == ranks[1]
    norms = ranks[0]
    assert norms["unpatched"] < 0.99 * norms["initialised"], norms  # defect: rank 1 shards dropped
    assert norms["patched"] == pytest.approx(norms["initialised"], rel=1e-6), norms


# ----------------------------------------------------------------------------- entry points
def _recording_apply_needed(monkeypatch) -> list:
    """Replaces ``registry.apply_needed`` by a pass-through that records its arguments."""
    calls, real = [], registry.apply_needed

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "apply_needed", recording)
    return calls


def test_train_runtime_applies_the_registry_for_this_host(restore_targets):
    """``runtime.initialize`` (``megacpp-mcore train``, the parity harness, the benchmarks) calls
    the registry's one entry function, for this host, and every needed entry is then in."""
    from megacpp_mcore.train import runtime

    calls = _recording_apply_needed(restore_targets)
    runtime.initialize(runtime.Parallelism(), seed=1234)
    try:
        assert calls == [((), {"host": registry.current_host()})]
        rows = {r.name: r for r in registry.status()}
        assert all(rows[n].applied for n in needed_here("spec-import-errors", "tp-attributes-without-init"))
        assert all(rows[n].applied == (registry.current_host() == "cpu") for n in needed_here(*CPU_SHIMS))
        assert not any(rows[n].applied for n in set(FIXED_IN) - set(needed_here(*FIXED_IN)))
    finally:
        runtime.shutdown()


def test_mla_patches_go_through_the_registry(restore_targets):
    from megacpp_mcore.layers import mla

    calls = _recording_apply_needed(restore_targets)
    changed = mla.apply_patches()
    assert calls == [((mla.PATCHES,), {})]
    assert set(mla.PATCHES) <= {m.NAME for m in registry.registered()}
    # REQUIRES and status honoured: without TE mla-down-proj-tp-marker is n/a and not applied
    assert set(changed) == {r.name for r in registry.status(mla.PATCHES) if r.check == "needed"}
    assert ("mla-have-te" in changed) == (expected_check("mla-have-te") == "needed")  # fixed 0.17


def test_importing_the_package_and_layer_specs_applies_no_patch():
    code = textwrap.dedent("""
        import importlib, json, pkgutil
        import megacpp_mcore, layer_specs
        for info in pkgutil.iter_modules(layer_specs.__path__):
            importlib.import_module("layer_specs." + info.name)
        from megacpp_mcore.patches import registry
        print(json.dumps({row.name: row.applied for row in registry.status()}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    applied = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(applied) == {m.NAME for m in registry.registered()}
    assert not any(applied.values()), applied
    assert sum(value is False for value in applied.values()) >= 9  # the probes did report


# ------------------------------------------------------ te-attention-backend-per-layer, per TE
WHEELS = Path.home() / ".cache" / "megacpp_mcore" / "wheels"
DPA_MODULE = "transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py"


def _te_wheel(version: str) -> Path:
    """TE's pure-Python wheel ``version`` (no install): from the cache, else pip-downloaded once."""
    name = f"transformer_engine-{version}-py3-none-any.whl"
    if not (WHEELS / name).exists():
        WHEELS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(WHEELS), f"transformer-engine=={version}"],
                       capture_output=True, timeout=300, check=False)
    assert (WHEELS / name).exists(), f"could not fetch {name} into {WHEELS}"
    return WHEELS / name


@pytest.mark.parametrize("te_version", ["2.11.0", "2.14.1", "2.16.0", "2.17.1", "2.18.0"])
def test_te_attention_backend_cache_is_still_process_wide(te_version):
    """``check()``'s criterion (``DotProductAttention.forward`` reads the module-global
    ``_attention_backends``) on TE's real source of every release the ``te`` extra allows (0.16:
    2.9 - 2.11; 0.17 - 0.19: upstream's locks 2.14.1, 2.16.0, 2.17.1, and 2.18.0): the patch stays
    needed, and TARGETS cover each of them."""
    import ast
    import zipfile

    from megacpp_mcore.patches import te_attention_backend_per_layer as patch

    source = zipfile.ZipFile(_te_wheel(te_version)).read(DPA_MODULE).decode()
    tree = ast.parse(source)
    assert any(isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == patch._GLOBAL
               for n in tree.body), "the module-global cache dict is still there"
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DotProductAttention")
    forward = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    forward.decorator_list, forward.returns = [], None  # compiled alone: no names to resolve
    for arg in (*forward.args.args, *forward.args.kwonlyargs):
        arg.annotation = None
    namespace: dict = {}
    exec(compile(ast.Module(body=[forward], type_ignores=[]), DPA_MODULE, "exec"), namespace)
    assert patch._reads_global(namespace["forward"])  # what check() probes: "needed"
    assert registry.parse_targets(patch.TARGETS).specifier.contains(te_version)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
                    reason="needs a CUDA GPU with Transformer Engine")
def test_train_on_te_applies_te_attention_backend_per_layer(tmp_path, monkeypatch):
    from test_data import make_tree

    from megacpp_mcore.models.presets import get_preset
    from megacpp_mcore.train import data, loop as training

    monkeypatch.setenv("MEGACPP_CACHE", str(tmp_path / "cache"))
    prefix = data.prepare(make_tree(tmp_path / "src", extra=120), tmp_path / "d" / "cpp",
                          valid_percent=20).prefix
    model = get_preset("ae-tiny").replace(name="custom(AE)", num_layers=2, seq_length=32)
    cfg = training.TrainConfig(steps=2, micro_batch_size=2, global_batch_size=2, lr=1e-3, min_lr=1e-4,
                               warmup_steps=1, log_interval=1, eval_interval=100, eval_iters=1,
                               data=prefix, backend="auto")
    rec = training.train(model, cfg, log=lambda _: None)
    assert rec["backends"]["resolved"] == "te"
    rows = {r.name: r for r in registry.status()}
    te_row = rows["te-attention-backend-per-layer"]
    assert (te_row.check, te_row.applied) == ("needed", True), te_row
    assert not any(rows[n].applied for n in CPU_SHIMS)  # never on a CUDA host


# ------------------------------------------------------------------ mamba-ssd-tuned-configs
class _Config:
    """The attributes of ``triton.Config`` the patch reads."""

    def __init__(self, num_warps, num_stages, **kwargs):
        self.kwargs, self.num_warps, self.num_stages = kwargs, num_warps, num_stages


class _Autotuner:
    def __init__(self, configs):
        self.configs, self.cache = configs, {}


def test_mamba_tuned_configs_seed_the_autotuners_own_choice():
    """Seeding puts the autotuner's own config object under the exact key Triton builds, keeps a
    choice this process already measured, and refuses a table entry the kernel no longer lists."""
    from megacpp_mcore.patches import mamba_ssd_tuned_configs as patch

    small, big = _Config(4, 3, BLOCK_SIZE_M=32), _Config(4, 3, BLOCK_SIZE_M=64)
    tuner = _Autotuner([small, big])
    entries = [("(128, 64, 'torch.bfloat16', True)", "BLOCK_SIZE_M=64 num_warps=4 num_stages=3"),
               ("(128, 32, 'torch.float32', False)", "BLOCK_SIZE_M=32 num_warps=4 num_stages=3")]
    added = patch.seed(tuner, entries, patch.NAME)
    assert len(added) == 2
    assert tuner.cache == {(128, 64, "torch.bfloat16", True): big, (128, 32, "torch.float32", False): small}
    assert tuner.cache[(128, 64, "torch.bfloat16", True)] is big  # the kernel's object, not a copy
    tuner.cache[(128, 64, "torch.bfloat16", True)] = small  # measured here: stays
    assert patch.seed(tuner, entries, patch.NAME) == []
    assert tuner.cache[(128, 64, "torch.bfloat16", True)] is small
    with pytest.raises(LookupError, match="mamba-ssd-tuned-configs: no configuration "
                                          "BLOCK_SIZE_M=16 num_warps=4 num_stages=3"):
        patch.seed(_Autotuner([small]), [("(1,)", "BLOCK_SIZE_M=16 num_warps=4 num_stages=3")],
                   patch.NAME)
    assert patch.parse_config("BLOCK_SIZE=512 num_warps=4 num_stages=3") == {
        "BLOCK_SIZE": 512, "num_warps": 4, "num_stages": 3}


def test_mamba_tuned_configs_table_and_status():
    """Every table entry is a key tuple Triton could build (shape values, then dtype names) and a
    parseable config; without mamba_ssm the row is n/a and nothing is applied."""
    import ast

    from megacpp_mcore.patches import mamba_ssd_tuned_configs as patch

    assert len(patch.TUNED) == 15 and sum(len(e) for e in patch.TUNED.values()) == 16
    for name, entries in patch.TUNED.items():
        for key, config in entries:
            key = ast.literal_eval(key)
            assert isinstance(key, tuple) and any(str(k).startswith("torch.") for k in key), name
            assert {"num_warps", "num_stages"} <= set(patch.parse_config(config)), name
    if importlib.util.find_spec("mamba_ssm") is None:
        row = next(r for r in registry.status(["mamba-ssd-tuned-configs"]))
        assert (row.check, row.action) == ("not-applicable", "n/a")
        assert row.note == "needs mamba_ssm, which is not installed here"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None
                    or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs an SM90 GPU with mamba_ssm")
def test_mamba_tuned_configs_leave_nothing_to_autotune_at_lite_shapes():
    """After the registry applied the patch, a bf16 forward and backward of the SSD scan at
    nam56r-lite's shapes (chunk 128, head dim 64, d_state 128, 64 heads) adds no autotuner key:
    every call found its seeded choice, none benchmarked."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    from megacpp_mcore.patches import mamba_ssd_tuned_configs as patch

    assert registry.status(["mamba-ssd-tuned-configs"])[0].check == "needed"
    registry.apply_needed(["mamba-ssd-tuned-configs"])
    assert patch.applied() is True
    kernels = patch._autotuners()
    before = {name: set(k.cache) for name, k in kernels.items()}
    b, s, h, p, n = 2, 1024, 64, 64, 128
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(b, s, h, p, **cuda, requires_grad=True)
    dt = torch.rand(b, s, h, **cuda, requires_grad=True)
    A = -torch.rand(h, device="cuda", dtype=torch.float32, requires_grad=True)
    B, C = (torch.randn(b, s, 1, n, **cuda, requires_grad=True) for _ in range(2))
    D = torch.ones(h, device="cuda", dtype=torch.float32, requires_grad=True)
    z = torch.randn(b, s, h, p, **cuda, requires_grad=True)
    dt_bias = torch.zeros(h, device="cuda", dtype=torch.float32, requires_grad=True)
    y = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=128, D=D, z=z, dt_bias=dt_bias,
                                  dt_softplus=True)
    y.float().square().mean().backward()
    torch.cuda.synchronize()
    grown = {name: set(k.cache) - before[name] for name, k in kernels.items()}
    assert not any(grown.values()), grown


# ------------------------------------------------------------------ te-permute-tuned-configs
def test_te_permute_tuned_configs_table_and_status():
    """Every table entry is a key tuple Triton could build (hidden size, then dtype names) with a
    BLOCK_SIZE TE's kernels list, seeded by the shared seeding (errors name this patch); without
    Transformer Engine the row is n/a and nothing is applied."""
    import ast

    from megacpp_mcore.patches import te_permute_tuned_configs as patch

    assert sum(len(e) for e in patch.TUNED.values()) == 4
    for name, entries in patch.TUNED.items():
        for key, config in entries:
            key = ast.literal_eval(key)
            assert key[0] == 2048 and all(str(k).startswith("torch.") for k in key[1:]), name
            assert patch.parse_config(config)["BLOCK_SIZE"] in (64, 128, 256, 512, 1024, 2048, 4096)
    tuner = _Autotuner([_Config(4, 3, BLOCK_SIZE=b) for b in (1024, 2048, 4096)])
    assert len(patch.seed(tuner, patch.TUNED["_permute_kernel"], patch=patch.NAME)) == 2
    assert tuner.cache[(2048, "torch.bfloat16", "torch.int32", "torch.bfloat16")] is tuner.configs[1]
    with pytest.raises(LookupError, match="te-permute-tuned-configs: no configuration BLOCK_SIZE=4096"):
        patch.seed(_Autotuner([_Config(4, 3, BLOCK_SIZE=64)]), patch.TUNED["_unpermute_kernel"],
                   patch=patch.NAME)
    if importlib.util.find_spec("transformer_engine") is None:
        row = next(r for r in registry.status(["te-permute-tuned-configs"]))
        assert (row.check, row.action) == ("not-applicable", "n/a")
        assert row.note == "needs transformer_engine, which is not installed here"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None
                    or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs an SM90 GPU with Transformer Engine")
def test_te_permute_tuned_configs_leave_nothing_to_autotune_at_lite_shapes():
    """After the registry applied the patch, Megatron's fused permutation as the MoE layer runs
    it (permute with fp32 probabilities, un-permute, forward and backward) at nam56r-lite's hidden
    size in bf16 adds no autotuner key: every call found its seeded choice, none benchmarked."""
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from megacpp_mcore.patches import te_permute_tuned_configs as patch

    assert registry.status(["te-permute-tuned-configs"])[0].check == "needed"
    registry.apply_needed(["te-permute-tuned-configs"])
    assert patch.applied() is True
    kernels = patch._autotuners()
    before = {name: set(k.cache) for name, k in kernels.items()}
    tokens, experts, topk = 4096, 16, 4
    x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scores = torch.randn(tokens, experts, device="cuda").softmax(-1)
    top = scores.topk(topk, dim=-1)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top.indices, True)
    probs = torch.zeros_like(scores).scatter(1, top.indices, top.values).requires_grad_()
    permuted, permuted_probs, row_id_map = permute(x, routing_map, probs=probs,
                                                   num_out_tokens=tokens * topk, fused=True)
    out = unpermute(permuted * permuted_probs.unsqueeze(-1).to(permuted.dtype), row_id_map,
                    restore_shape=x.shape, routing_map=routing_map, fused=True)
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    grown = {name: set(k.cache) - before[name] for name, k in kernels.items()}
    assert not any(grown.values()), grown

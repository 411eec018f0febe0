"""A/B of the M2RNN Triton kernels of two revisions (CUDA) at the full-width stage's shape (B4
T4096 H32 K64 V16), bf16 inputs; then this tree's kernel over block_k x num_warps x precision.
Needs only torch and Triton (both kernels are loaded by file path, not through the package). The
old side is any revision's file, e.g. d04f2ec's (the kernel before tl.dot, docs/benchmarks.md):

    git show d04f2ec:megacpp_mcore/layers/mixers/m2rnn_triton.py > tmp_m2rnn_old.py   # untracked
    python -u scripts/ab_m2rnn.py [B T H K V]                                       # on the GPU machine
    python scripts/ab_m2rnn.py --static [B T H K V]       # here: registers/spills/mma for sm_90, no GPU

Each config: median of 3 x 10 reps of fwd+bwd, the forward alone, the largest relative L2 error
against the old kernel (y and every gradient, in the inputs' bf16: ~5e-3 is a rounding step) and
against an fp64 CPU scan (B2 T300 H4 K64 V16, fp32 inputs: the accuracy that matters)."""
import sys, time, torch, torch.nn.functional as F
import importlib.util
def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path); mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod); return mod
old = _load("m2rnn_old", "tmp_m2rnn_old.py")
cand = _load("m2rnn_cand", "megacpp_mcore/layers/mixers/m2rnn_triton.py")
SWEEP = ((16, 2, "tf32x3"), (32, 1, "tf32x3"), (32, 2, "tf32x3"), (64, 2, "tf32x3"), (64, 4, "tf32x3"),
         (16, 1, "ieee"), (32, 2, "ieee"), (16, 1, "tf32"))
if sys.argv[1:2] == ["--static"]:  # on any host: what ptxas allots each kernel for sm_90, no GPU
    sys.path.insert(0, ".")
    from megacpp_mcore.testing.kernel_compile import compile_sm90, recorded, resources
    B, T, H, K, V = (int(x) for x in (sys.argv[2:] or [1, 4096, 32, 64, 16]))
    print("| kernel | config | fwd regs / spill B / mma | bwd regs / spill B / mma |\n|---|---|---|---|")
    for name, mod, kw in [("old", old, {}), ("this tree", cand, {})] + [
            ("this tree", cand, dict(block_k=bk, num_warps=nw, precision=p)) for bk, nw, p in SWEEP]:
        with recorded(mod, "_m2rnn_fwd_kernel", "_m2rnn_bwd_kernel") as log:
            ins = [torch.zeros(B, T, H, K, dtype=torch.bfloat16), torch.zeros(B, T, H, K, dtype=torch.bfloat16),
                   torch.zeros(B, T, H, V, dtype=torch.bfloat16), torch.zeros(B, T, H, dtype=torch.bfloat16),
                   torch.zeros(H, V, V)]
            ins = [x.requires_grad_() for x in ins]
            y = mod.m2rnn_scan_triton(*ins, **kw)
            torch.autograd.grad(y, ins, torch.zeros_like(y))
        cells = []
        for launch in log:
            r = resources(compile_sm90(launch))
            cells.append(f"{r['registers']} / {r['spill_bytes']} / {r['mma']}")
        print(f"| {name} | {kw or 'default'} | {cells[0]} | {cells[1]} |", flush=True)
    sys.exit(0)
B, T, H, K, V = (int(x) for x in (sys.argv[1:] or [4, 4096, 32, 64, 16]))
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
q = F.normalize(torch.randn(B, T, H, K, device=dev, generator=g), dim=-1).bfloat16().requires_grad_()
k = F.normalize(torch.randn(B, T, H, K, device=dev, generator=g), dim=-1).bfloat16().requires_grad_()
v = torch.randn(B, T, H, V, device=dev, generator=g).bfloat16().requires_grad_()
f = torch.rand(B, T, H, device=dev, generator=g).bfloat16().requires_grad_()
W = (torch.randn(H, V, V, device=dev, generator=g) * 0.3).requires_grad_()
dy = torch.randn(B, T, H, V, device=dev, generator=g).bfloat16()
ins = (q, k, v, f, W)
def timed(fn, reps=10):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / reps
def fb(mod, kw):
    y = mod.m2rnn_scan_triton(*ins, **kw)
    return y, torch.autograd.grad(y, ins, dy)
ref = fb(old, {}); ref = (ref[0], *ref[1])
# precision: against an fp64 CPU scan at B2 T300 H4 K64 V16 (fp32 inputs), as tests/test_mixers.py does
def _scan64(q, k, v, f, W):
    b, s, nh, kd = k.shape
    st = k.new_zeros(b, nh, kd, v.shape[-1]); ys = []
    for t in range(s):
        ft = f[:, t, :, None, None]
        st = ft * st + (1 - ft) * torch.tanh(st @ W + k[:, t, :, :, None] * v[:, t, :, None, :])
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], st))
    return torch.stack(ys, dim=1)
g2 = torch.Generator().manual_seed(3)
small = [F.normalize(torch.randn(2, 300, 4, 64, generator=g2), dim=-1), F.normalize(torch.randn(2, 300, 4, 64, generator=g2), dim=-1),
         torch.randn(2, 300, 4, 16, generator=g2), torch.sigmoid(torch.randn(2, 300, 4, generator=g2) + 2.0),
         torch.randn(4, 16, 16, generator=g2) * 0.125]
sdy = torch.randn(2, 300, 4, 16, generator=g2)
def _run_small(fn, dtype, device):
    ins_ = [t.to(device=device, dtype=dtype).requires_grad_() for t in small]
    y = fn(*ins_)
    return [t.detach().double().cpu() for t in (y, *torch.autograd.grad(y, ins_, sdy.to(device=device, dtype=dtype)))]
exact = _run_small(_scan64, torch.float64, "cpu")
def _err64(outs):
    return max(float((a - b).norm() / b.norm()) for a, b in zip(outs, exact))
print(f"fp32 torch scan vs fp64: {_err64(_run_small(_scan64, torch.float32, 'cpu')):.1e}", flush=True)
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
configs = [("old", old, {}), ("cand", cand, {})]  # old: tmp_m2rnn_old.py; cand: this tree
for bk, nw, prec in SWEEP:
    configs.append((f"cand {prec}", cand, dict(block_k=bk, num_warps=nw, precision=prec)))
configs += [("old", old, {}), ("cand", cand, {}), ("old", old, {}), ("cand", cand, {})]
res = []
t_start = time.time()
for name, mod, kw in configs:
    try:
        t0 = time.time()
        out = fb(mod, kw); out = (out[0], *out[1])
        err = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(out, ref))
        e64 = _err64(_run_small(lambda *a: mod.m2rnn_scan_triton(*a, **kw), torch.float32, dev))
        ms = sorted(timed(lambda: fb(mod, kw)) for _ in range(3))[1]
        with torch.no_grad():
            fms = timed(lambda: mod.m2rnn_scan_triton(*ins, **kw))
    except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
        print(f"{name} {kw}: {type(e).__name__} {str(e)[:200]}", flush=True)
        continue
    res.append((ms, fms, name, kw, err, e64))
    print(f"{name:12s} {str(kw):55s} fwd+bwd {ms:7.2f} ms fwd {fms:6.2f} ms err {err:.1e} fp64 {e64:.1e} ({time.time()-t0:.0f}s, {time.time()-t_start:.0f}s)", flush=True)
o = sorted(r[0] for r in res if r[2] == "old" and not r[3])
o = o[len(o) // 2]
print("\n| kernel | config | fwd+bwd ms | fwd ms | vs main | max rel err vs main | vs fp64 |")
print("|---|---|---|---|---|---|---|")
for ms, fms, name, kw, err, e64 in sorted(res, key=lambda r: r[0]):
    print(f"| {name} | {kw} | {ms:.2f} | {fms:.2f} | x{o / ms:.3f} | {err:.1e} | {e64:.1e} |")

"""Every Triton kernel against its PyTorch reference: on CPU through Triton's interpreter (conftest
sets TRITON_INTERPRET=1), on a GPU compiled. Odd sizes on purpose: hidden sizes that are not powers
of two, row counts that do not fill a program."""
import pytest
import torch
from conftest import assert_close, small_model

pytest.importorskip("triton")
import kernels as K  # noqa: E402
from kernels.rmsnorm import rms_norm_reference, rms_norm_triton  # noqa: E402
from kernels.swiglu import swiglu_reference, swiglu_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def forward_backward(fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return out, [t.grad for t in inputs]


@pytest.mark.parametrize("rows,cols", [(1, 64), (37, 100), (20, 257)])
def test_rmsnorm_forward_and_backward_equal_the_reference(rows, cols):
    torch.manual_seed(0)
    x, w = torch.randn(rows, cols, device=DEVICE) * 3, torch.rand(cols, device=DEVICE) + 0.5
    g = torch.randn(rows, cols, device=DEVICE)
    y_ref, (dx_ref, dw_ref) = forward_backward(lambda a, b: rms_norm_reference(a, b, 1e-5), [x, w], g)
    y, (dx, dw) = forward_backward(lambda a, b: rms_norm_triton(a, b, 1e-5), [x, w], g)
    assert_close(y, y_ref)
    assert_close(dx, dx_ref)
    assert_close(dw, dw_ref)


def test_rmsnorm_in_bf16_with_an_fp32_weight_is_within_bf16_rounding():
    torch.manual_seed(0)
    x, w = torch.randn(2, 7, 96, device=DEVICE).bfloat16(), torch.rand(96, device=DEVICE) + 0.5
    y_ref, y = rms_norm_reference(x, w, 1e-6), rms_norm_triton(x, w, 1e-6)
    assert y.dtype == y_ref.dtype == torch.float32
    assert_close(y, y_ref, dtype=torch.bfloat16, ulps=1)  # one bf16 rounding apart at most


@pytest.mark.parametrize("shape", [(5,), (3, 1000), (2, 7, 688)])
def test_swiglu_forward_and_backward_equal_the_reference(shape):
    torch.manual_seed(0)
    gate, up, g = (torch.randn(shape, device=DEVICE) * 2 for _ in range(3))
    h_ref, (dg_ref, du_ref) = forward_backward(swiglu_reference, [gate, up], g)
    h, (dg, du) = forward_backward(swiglu_triton, [gate, up], g)
    assert_close(h, h_ref)
    assert_close(dg, dg_ref)
    assert_close(du, du_ref)


def test_unknown_kernel_name_is_refused():
    import train
    with pytest.raises(ValueError, match="flag --kernels_off: unknown kernel 'rotary'; kernels are nf4, nf4_matmul, rmsnorm, swiglu, linear_ce, rope, lora"):
        train.parse_args(["--kernels_off=rotary"])


@pytest.mark.parametrize("n,vocab,chunk", [(13, 100, 5), (8, 257, 8), (6, 64, 4)])
def test_fused_linear_cross_entropy_equals_the_chunked_reference(n, vocab, chunk):
    from kernels.linear_ce import linear_cross_entropy_triton
    torch.manual_seed(0)
    h, w = torch.randn(n, 24, device=DEVICE), torch.randn(vocab, 24, device=DEVICE) * 0.3
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[1] = -100  # an ignored row in the middle
    keep = labels != -100

    def reference(h_, w_):
        return torch.nn.functional.cross_entropy(h_[keep] @ w_.t(), labels[keep], reduction="sum")

    ref, (dh_ref, dw_ref) = forward_backward(reference, [h, w], torch.tensor(1.5, device=DEVICE))
    out, (dh, dw) = forward_backward(lambda a, b: linear_cross_entropy_triton(a, b, labels, chunk), [h, w],
                                     torch.tensor(1.5, device=DEVICE))
    assert_close(out, ref)
    assert_close(dh, dh_ref)
    assert_close(dw, dw_ref)
    assert dh[1].abs().sum() == 0  # the ignored row gets no gradient
    all_ignored = torch.full((n,), -100, device=DEVICE)
    assert linear_cross_entropy_triton(h, w, all_ignored, chunk).item() == 0.0


def test_fused_linear_cross_entropy_under_bf16_autocast_gives_the_fp32_weight_its_gradient():
    # Full fine-tuning: fp32 master weight, bf16 autocast; grad_W is summed over row chunks and
    # vocabulary slices (vocab 100 > chunk 16), within bf16 rounding of the fp32 computation.
    from kernels.linear_ce import linear_cross_entropy_triton
    torch.manual_seed(0)
    h, w = torch.randn(40, 32, device=DEVICE), torch.randn(100, 32, device=DEVICE) * 0.3
    labels = torch.randint(0, 100, (40,), device=DEVICE)
    ref, (dh_ref, dw_ref) = forward_backward(
        lambda a, b: torch.nn.functional.cross_entropy(a @ b.t(), labels, reduction="sum"), [h, w], torch.tensor(1.0))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, (dh, dw) = forward_backward(lambda a, b: linear_cross_entropy_triton(a, b, labels, 16), [h, w],
                                         torch.tensor(1.0, device=DEVICE))
    assert dw.dtype == torch.float32
    assert ((dw - dw_ref).norm() / dw_ref.norm()).item() < 2e-2
    assert ((dh.float() - dh_ref).norm() / dh_ref.norm()).item() < 2e-2
    assert abs(out.item() - ref.item()) / ref.item() < 1e-2


def test_rope_in_place_forward_and_backward_equal_the_reference():
    """Per-token positions as packing makes them (restarting per document); q as the model views it
    (a transposed, non-contiguous view of the projection output); odd head and token counts."""
    from kernels.rope import rope_reference, rope_triton
    import model as M
    torch.manual_seed(0)
    B, T, H, hd = 2, 7, 3, 16
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]], device=DEVICE)
    cos, sin = M.rope_cos_sin(M.rope_frequencies(M.ModelArgs(dim=H * hd, n_heads=H, n_kv_heads=H)).to(DEVICE), pos,
                              torch.float32)
    q = torch.randn(B, T, H * hd, device=DEVICE).view(B, T, H, hd).transpose(1, 2)
    g = torch.randn(B, H, T, hd, device=DEVICE)
    ref, (dq_ref,) = forward_backward(lambda a: rope_reference(a, cos, sin), [q], g)
    q2 = q.detach().clone().requires_grad_(True)
    out = rope_triton(q2.clone(), cos, sin)  # in place on the clone (a leaf cannot be modified in place)
    out.backward(g)
    assert_close(out, ref)
    assert_close(q2.grad, dq_ref)


@pytest.mark.parametrize("rows,n,k,double_quant", [(1, 50, 128, True), (5, 96, 192, False), (16, 33, 64, True)])
def test_nf4_matmul_from_codes_equals_dequantize_then_matmul(rows, n, k, double_quant):
    import quant as Q
    from kernels.nf4 import nf4_matmul_reference, nf4_matmul_triton
    torch.manual_seed(0)
    s = Q.quantize_nf4(torch.randn(n, k, device=DEVICE), double_quant=double_quant)
    nf4, dynamic = Q.codes_on(DEVICE)
    args = (s["weight"], s["absmax"], nf4, 64, torch.Size((n, k)), s["nested_absmax"], dynamic, 256, s["offset"])
    x = torch.randn(rows, k, device=DEVICE)
    assert_close(nf4_matmul_triton(x, *args, bn=16), nf4_matmul_reference(x, *args))


def test_linear4bit_uses_the_codes_directly_for_few_rows(monkeypatch):
    import quant as Q
    K.select("interpret" if DEVICE == "cpu" else "triton")  # conftest restores the default after each test
    layer = Q.Linear4bit(128, 40, bias=True, device=DEVICE)
    layer.set_weight(torch.randn(40, 128, device=DEVICE))
    layer.bias = torch.nn.Parameter(torch.randn(40, device=DEVICE), requires_grad=False)
    x = torch.randn(2, 3, 128, device=DEVICE)  # 6 rows: the fused path
    dense = x @ layer.dequantize(torch.float32).t() + layer.bias
    assert_close(layer(x), dense)


@pytest.mark.parametrize("m,n,r", [(7, 50, 4), (40, 130, 16), (3, 64, 20)])
def test_lora_add_forward_and_backward_equal_the_reference(m, n, r):
    from kernels.lora import lora_add_reference, lora_add_triton
    torch.manual_seed(0)
    y, xa, b = torch.randn(m, n, device=DEVICE), torch.randn(m, r, device=DEVICE), torch.randn(n, r, device=DEVICE)
    g = torch.randn(m, n, device=DEVICE)
    ref, grads_ref = forward_backward(lambda a, c, d: lora_add_reference(a, c, d, 0.5), [y, xa, b], g)
    out, grads = forward_backward(lambda a, c, d: lora_add_triton(a, c, d, 0.5), [y, xa, b], g)
    assert_close(out, ref)
    for got, want in zip(grads, grads_ref):
        assert_close(got, want)


@pytest.mark.parametrize("variant", ["dense", "lora", "qlora"])
def test_whole_model_loss_and_gradients_equal_with_and_without_kernels(monkeypatch, variant):
    """Every kernel at once against every reference. QLoRA with 9 tokens, so that the 4-bit layers
    take the few-rows nf4_matmul path."""
    import lora as L
    import quant as Q
    x = torch.randint(0, 50, (2, 9) if variant == "dense" else (1, 9), device=DEVICE)
    results = []
    for force in (False, True):
        K.select(("interpret" if DEVICE == "cpu" else "triton") if force else "torch")
        m = small_model(seed=3).to(DEVICE)
        if variant == "qlora":
            Q.quantize_model(m)
        if variant != "dense":
            L.add_lora(m, rank=4, alpha=8, targets="q_proj,v_proj,down_proj", generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        s, n = m(x, labels=x)
        s.backward()
        results.append((s.detach(), {k: p.grad for k, p in m.named_parameters() if p.requires_grad}))
    (s0, g0), (s1, g1) = results
    assert_close(s1, s0)
    for k in g0:
        assert_close(g1[k], g0[k], msg=k)


@pytest.mark.slow  # ptxas over 24 kernel variants
def test_every_kernel_compiles_for_h100_and_rtx_3090_without_spilling():
    """The interpreter accepts programs the GPU compiler rejects: compile each kernel, with the
    argument types its wrapper launches it with, down to sm_90 and sm_86 cubins (no GPU needed)."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "compile_kernels.py"), "--arch=90,86"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines()[1:-1]]
    kernels = {"_rms_forward", "_rms_backward", "_swiglu_forward", "_swiglu_backward", "_rope", "_lora_add_kernel",
               "_ce_rows", "_dequantize_nf4_kernel", "_nf4_matmul_kernel"}
    assert {row[0] for row in rows} == kernels and all(row[-2] == "0" for row in rows), r.stdout  # no spilled bytes
    assert r.stdout.splitlines()[-1] == "compiled 24 kernel variants for sm_90, sm_86; 0 failures"


def test_the_fused_loss_holds_one_chunk_of_logits_and_one_weight_gradient_at_a_time():
    from conftest import bench
    from kernels.linear_ce import linear_cross_entropy_triton
    if DEVICE != "cpu":
        pytest.skip("the CPU allocator's records (bench/memory.py) measure this")
    cpu_allocation_peak = bench("memory").cpu_allocation_peak
    K.select("interpret")
    n, vocab, dim, chunk = 96, 2048, 256, 32
    torch.manual_seed(0)
    h, w = torch.randn(n, dim, requires_grad=True), (torch.randn(vocab, dim) * 0.02).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,))
    logits, grad_w, grad_h = chunk * vocab * 4, vocab * dim * 4, n * dim * 4
    cpu_allocation_peak(lambda: linear_cross_entropy_triton(h, w, labels, chunk))  # the first profile's own setup
    forward = cpu_allocation_peak(lambda: linear_cross_entropy_triton(h, w, labels, chunk))
    # grad_W and grad_h for the whole loss, one chunk of logits, and small change (loss rows, scalars)
    assert forward <= grad_w + grad_h + logits + 64 * 1024, (forward, grad_w + grad_h + logits)
    both = cpu_allocation_peak(lambda: (linear_cross_entropy_triton(h, w, labels, chunk) * 2.0).backward())
    assert both < 2 * grad_w  # backward scales grad_W in place: never a second [vocab, dim] tensor


def test_the_lora_add_backward_makes_no_fp32_copy_of_the_output_gradient():
    from conftest import bench
    from kernels.lora import lora_add_triton
    if DEVICE != "cpu":
        pytest.skip("the CPU allocator's records (bench/memory.py) measure this")
    cpu_allocation_peak = bench("memory").cpu_allocation_peak
    M, N, R = 256, 512, 8
    y = torch.randn(M, N, dtype=torch.bfloat16, requires_grad=True)
    xa = torch.randn(M, R, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(N, R, requires_grad=True)  # the fp32 master weight, as under autocast
    dy = torch.randn(M, N, dtype=torch.bfloat16)
    out = lora_add_triton(y, xa, b, 2.0)
    cpu_allocation_peak(lambda: None)  # the first profile's own setup
    peak = cpu_allocation_peak(lambda: out.backward(dy))
    assert peak < M * N * 4  # the gradients of xa and b, and y's (dy itself): no [M, N] fp32 tensor
    want_xa = (dy.float() @ b.detach()) * 2.0
    assert ((xa.grad.float() - want_xa).norm() / want_xa.norm()) < 1e-2  # bf16 products, fp32 sums


class Launches:
    """Stands in for a Triton kernel and records the grid of each launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


def test_rope_launches_one_program_per_token_for_all_its_heads(monkeypatch):
    """Not one per (head, token): cos and sin are read once per token and each program has
    H * head_dim values to move, not head_dim (5 heads: not a power of two)."""
    import kernels.rope as R
    import model as M
    launches = Launches(R._rope)
    monkeypatch.setattr(R, "_rope", launches)
    B, T, H, hd = 2, 6, 5, 8
    pos = torch.arange(T, device=DEVICE)[None].expand(B, T)
    cos, sin = M.rope_cos_sin(M.rope_frequencies(M.ModelArgs(dim=H * hd, n_heads=H, n_kv_heads=H)).to(DEVICE), pos,
                              torch.float32)
    q = torch.randn(B, T, H, hd, device=DEVICE).transpose(1, 2)
    g = torch.randn(B, H, T, hd, device=DEVICE)
    ref, (dq_ref,) = forward_backward(lambda a: R.rope_reference(a, cos, sin), [q], g)
    out, (dq,) = forward_backward(lambda a: R.rope_triton(a * 1, cos, sin), [q], g)
    assert launches.grids == [(B * T,), (B * T,)]  # forward, backward
    assert_close(out, ref)
    assert_close(dq, dq_ref)


@pytest.mark.parametrize("rows", [3, 1000])
def test_rmsnorm_backward_launches_a_fixed_number_of_programs_whatever_the_rows(monkeypatch, rows):
    """At most 2 programs per streaming multiprocessor (the interpreter counts 4), each walking a run
    of rows, none idle: a short batch still fills the device, a long one does not grow the fp32
    partial sums."""
    import kernels.rmsnorm as R
    launches = Launches(R._rms_backward)
    monkeypatch.setattr(R, "_rms_backward", launches)
    torch.manual_seed(0)
    x, w, g = torch.randn(rows, 48, device=DEVICE), torch.rand(48, device=DEVICE) + 0.5, torch.randn(rows, 48, device=DEVICE)
    _, (dx_ref, dw_ref) = forward_backward(lambda a, b: R.rms_norm_reference(a, b, 1e-5), [x, w], g)
    _, (dx, dw) = forward_backward(lambda a, b: R.rms_norm_triton(a, b, 1e-5), [x, w], g)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 4
    per_program = -(-rows // min(rows, 2 * sms))
    assert launches.grids == [(-(-rows // per_program),)]
    assert_close(dx, dx_ref)
    assert_close(dw, dw_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_matmul_decodes_each_block_of_codes_once_for_up_to_16_rows(monkeypatch, dtype):
    """1 row and 16 rows launch the same programs (each decodes its codes once for all the rows),
    and give the reference's result: dequantize to x's dtype, then multiply."""
    import kernels.nf4 as N
    import quant as Q
    launches = Launches(N._nf4_matmul_kernel)
    monkeypatch.setattr(N, "_nf4_matmul_kernel", launches)
    torch.manual_seed(0)
    s = Q.quantize_nf4(torch.randn(40, 128, device=DEVICE))
    nf4, dynamic = Q.codes_on(DEVICE)
    args = (s["weight"], s["absmax"], nf4, 64, torch.Size((40, 128)), s["nested_absmax"], dynamic, 256, s["offset"])
    for rows in (1, 16):
        x = torch.randn(rows, 128, device=DEVICE, dtype=dtype)
        got, ref = N.nf4_matmul_triton(x, *args, bn=16), N.nf4_matmul_reference(x, *args)
        assert got.dtype == dtype
        assert_close(got.float(), ref.float(), dtype=dtype, scale=ref.float().abs().max().item())
    assert launches.grids == [(1, 3), (1, 3)]

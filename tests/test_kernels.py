"""The kernel layer: every kernel of every precision computes x @ W^T of its own codes, the
registry picks by CPU features and falls back to the kernel that runs anywhere, builders from
existing codes match their dequantised rows, and resident bytes follow the precision."""
from __future__ import annotations

import pytest
import torch

from tensorslm.rank_store import kernels as K
from tensorslm.rank_store.kernels import CpuFeatures, KernelError, Precision

X86_BF16 = CpuFeatures("x86_64", "AVX512", bf16=True, neon=False, kleidiai=False)
X86_OLD = CpuFeatures("x86_64", "AVX2", bf16=False, neon=False, kleidiai=False)
PI5 = CpuFeatures("aarch64", "DEFAULT", bf16=False, neon=True, kleidiai=True)
PI_NO_KLEIDI = CpuFeatures("aarch64", "DEFAULT", bf16=False, neon=True, kleidiai=False)
ODD = CpuFeatures("riscv64", "DEFAULT", bf16=False, neon=False, kleidiai=False)


def _dequantised(weight: torch.Tensor, precision: Precision) -> torch.Tensor:
    """The weight the kernels of ``precision`` must multiply by (their own quantisation)."""
    if precision in (Precision.INT8, Precision.W8A8):
        codes, scales = K.quantize_int8_rows(weight)
        return codes.float() * scales[:, None]
    if precision is Precision.INT4:
        codes, scales = K.quantize_int4_groups(weight, 32)
        n, k = codes.shape
        return (codes.float().reshape(n, k // 32, 32) * scales[:, :, None]).reshape(n, k)
    if precision is Precision.BF16:
        return weight.to(torch.bfloat16).float()
    return weight


#: relative error of a kernel against x @ W_dequantised^T: bf16 activations (8-bit mantissa)
#: or int8 dynamic activations round the input, nothing else differs
KERNEL_TOLERANCE = 2e-2


@pytest.mark.parametrize("name", K.kernel_names())
def test_every_kernel_multiplies_by_its_own_dequantised_weight(name):
    torch.manual_seed(0)
    weight, x, bias = torch.randn(96, 256), torch.randn(3, 5, 256), torch.randn(96)
    kernel = K._KERNELS[name]
    with K.force_kernel(name):
        linear = K.pack_linear(weight, kernel.precision, bias=bias)
    assert linear.kernel == name
    y = linear(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, 96)
    ref = x @ _dequantised(weight, kernel.precision).T + bias
    assert float((y - ref).norm() / ref.norm()) < KERNEL_TOLERANCE
    # and against the float weight, within what the precision loses
    exact = x @ weight.T + bias
    loss = {Precision.FP32: 1e-6, Precision.BF16: 1e-2, Precision.INT8: 2e-2,
            Precision.W8A8: 2e-2, Precision.INT4: 0.15}[kernel.precision]
    assert float((y - exact).norm() / exact.norm()) < loss


@pytest.mark.parametrize("cpu,precision,expected", [
    (X86_BF16, "int4", "int4pack-bf16"),
    (X86_BF16, "bf16", "bf16-matmul"),
    (X86_BF16, "int8", "int8-planes-bf16"),
    (X86_OLD, "int8", "int8-dequant"),
    (PI5, "int8", "int8pack-fp32"),
    (PI_NO_KLEIDI, "int8", "int8pack-fp32"),
    (X86_OLD, "int4", "int4-dequant"),
    (X86_OLD, "bf16", "bf16-upcast"),
    (PI5, "int4", "int4-dynquant"),
    (PI_NO_KLEIDI, "int4", "int4pack-fp32"),
    (PI5, "bf16", "bf16-upcast"),
    (ODD, "int4", "int4-dequant"),
    (ODD, "int8", "int8-dequant"),
    (ODD, "fp32", "fp32-matmul"),
])
def test_registry_picks_by_cpu_and_falls_back_to_a_kernel_that_runs_anywhere(cpu, precision,
                                                                              expected):
    assert K.select_kernel(precision, cpu).name == expected
    assert K.REGISTRY[Precision(precision)][-1].requires(ODD)


def test_int8_prefers_the_planes_then_int8pack_and_falls_back_to_dequantising():
    names = K.kernel_names("int8")
    assert names[:2] == ("int8-planes-bf16", "int8pack-bf16") and names[-1] == "int8-dequant"
    assert K.select_kernel("int8", ODD).name == "int8-dequant"
    # the planes need in_features divisible by an int4 group size; int8pack takes any width
    assert K.select_kernel("int8", X86_BF16, shape=(576, 576)).name == "int8-planes-bf16"
    assert K.select_kernel("int8", X86_BF16, shape=(640, 48)).name == "int8pack-bf16"
    assert K.select_kernel("int8", PI5, shape=(3072, 576)).name == "int8pack-fp32"


def test_int8_codes_split_exactly_into_two_int4_planes():
    codes = torch.arange(-128, 128, dtype=torch.int8).reshape(16, 16)
    hi, lo = K.split_int8_planes(codes)
    assert torch.equal(16 * hi.to(torch.int16) + lo, codes.to(torch.int16))
    assert (int(hi.min()), int(hi.max()), int(lo.min()), int(lo.max())) == (-8, 7, 0, 15)


def test_int8_planes_are_exact_where_bf16_holds_every_product():
    # power-of-two scales and one-hot x: each plane's product (16 hi + 8) s or (lo - 8) s has
    # at most 8 significant bits, so nothing rounds and the output is codes * s exactly (the
    # planes' scales 16 s and s and the zero 8 s add up with no offset left over)
    codes = torch.arange(-128, 128, dtype=torch.int8).reshape(8, 32).repeat(1, 2)  # (8, 64)
    scales = 2.0 ** -torch.arange(3, 11, dtype=torch.float32)  # (8,)
    with K.force_kernel("int8-planes-bf16"):
        y = K.pack_int8_rows(codes, scales)(torch.eye(64))  # (64, 8): column j of every row
    assert torch.equal(y, (codes.float() * scales[:, None]).T)


#: int8-planes-bf16 against x~ . codes * bf16(s) (x~ = bf16(x), computed in float64): each of
#: its two products is rounded to bf16, |error_v| <= (1 + 2^-8)^2 2^-8 ||x~|| q_v, with q_v the
#: summed plane row norms (kernels.plane_row_norms); 1.02 for the float32 sums over K <= 1,536
PLANES_OUTPUT_BOUND = 1.02 * 2.0 ** -8


@pytest.mark.parametrize("n,k", [(96, 256), (20, 576), (80, 576), (576, 1536), (4100, 64)])
def test_int8_planes_round_only_their_two_products(n, k):
    torch.manual_seed(n)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n) / 50 + 1e-3
    x = torch.randn(3, k) * torch.rand(3, 1) * 10
    with K.force_kernel("int8-planes-bf16"):
        lin = K.pack_int8_rows(codes, scales)
    assert lin.kernel == "int8-planes-bf16"
    y = lin(x).double()
    xb = x.to(torch.bfloat16).double()
    exact = xb @ (codes.double() * scales.to(torch.bfloat16).double()[:, None]).T  # (3, n)
    bound = PLANES_OUTPUT_BOUND * xb.norm(dim=1, keepdim=True) * K.plane_row_norms(codes, scales).double()
    assert torch.all((y - exact).abs() <= bound)
    assert torch.all(K.plane_row_norms(codes, scales) >= codes.float().norm(dim=1) * scales * (1 - 1e-6))
    # rows of -1 (planes -8 and +7) against x of ones: the two rounded products nearly cancel,
    # so the error exceeds 2^-8 ||x|| ||t_v|| (what a one-product kernel obeys) and stays
    # within the plane bound
    minus = -torch.ones(n, k, dtype=torch.int8)
    with K.force_kernel("int8-planes-bf16"):
        y = K.pack_int8_rows(minus, scales)(torch.ones(1, k)).double()
    sb = scales.to(torch.bfloat16).double()
    err = (y[0] + k * sb).abs()  # exact: -k * bf16(s)
    assert torch.any(err > PLANES_OUTPUT_BOUND * k * sb)
    assert torch.all(err <= PLANES_OUTPUT_BOUND * k ** 0.5 * K.plane_row_norms(minus, scales).double())
    # resident: a byte per weight (two nibbles) plus a bf16 scale and zero per plane row and group
    g = K.int4_group_for(k)
    rows = n + (-n % K.PLANE_ROW_MULTIPLE)
    assert lin.nbytes == rows * k + (k // g) * 2 * rows * 2 * 2


def test_forced_fallback_serves_and_is_recorded_then_released():
    torch.manual_seed(1)
    weight, x = torch.randn(64, 128), torch.randn(2, 128)
    fast = K.select_kernel("int4").name
    K.reset_kernels_used()
    with K.force_kernel("int4-dequant"):
        slow = K.pack_linear(weight, "int4")
    quick = K.pack_linear(weight, "int4")
    assert (slow.kernel, quick.kernel) == ("int4-dequant", fast)
    assert torch.allclose(slow(x), quick(x), rtol=0, atol=5e-2 * float(quick(x).abs().max()))
    assert K.kernels_used() == {"int4-dequant": 1, fast: 1} if fast != "int4-dequant" else True


def test_unknown_kernel_and_precision_are_refused_with_the_valid_names():
    with pytest.raises(KernelError, match="unknown kernel 'int3'.*int4pack-bf16"):
        with K.force_kernel("int3"):
            pass
    with pytest.raises(KernelError, match="unknown precision 'int5'; expected one of fp32, bf16, int8, int4"):
        Precision.parse("int5")


def test_row_codes_pack_exactly_what_they_hold():
    torch.manual_seed(2)
    x = torch.randn(4, 576)
    codes8 = torch.randint(-127, 128, (80, 576), dtype=torch.int8)
    scales8 = torch.rand(80) / 100
    lin8 = K.pack_int8_rows(codes8, scales8)
    ref8 = x @ (codes8.float() * scales8[:, None]).T
    assert float((lin8(x) - ref8).norm() / ref8.norm()) < KERNEL_TOLERANCE
    codes4 = torch.randint(-8, 8, (80, 576), dtype=torch.int8)
    scales4 = torch.rand(80)
    for name in K.kernel_names("int4"):
        with K.force_kernel(name):
            lin4 = K.pack_int4_rows(codes4, scales4)
        ref4 = x @ (codes4.float() * scales4[:, None]).T
        assert float((lin4(x) - ref4).norm() / ref4.norm()) < KERNEL_TOLERANCE, name
    assert lin4.group_size == 64   # the largest group dividing 576


def _forced(name, build, *args):
    with K.force_kernel(name):
        return build(*args)


@pytest.mark.parametrize("call,message", [
    (lambda: K.pack_int4_rows(torch.full((4, 64), 9, dtype=torch.int8), torch.ones(4)),
     r"codes must lie in \[-8, 7\], got \[9, 9\]"),
    (lambda: K.pack_int8_rows(torch.zeros(4, 64, dtype=torch.int8), torch.ones(5)),
     r"expected scales of shape \(4,\) for codes \(4, 64\), got \(5,\)"),
    (lambda: K.pack_int8_rows(torch.zeros(4, 64), torch.ones(4)),
     "expected codes as an int8"),
    (lambda: K.pack_linear(torch.randn(4, 48), "int4"),
     "int4 group size must be one of .* got group 32 for in_features 48"),
    (lambda: K.pack_linear(torch.randn(4), "int8"),
     r"expected a floating-point \(out_features, in_features\) weight"),
    (lambda: _forced("int8-planes-bf16", K.pack_linear, torch.randn(4, 48), "int8"),
     r"in_features 48 is not a multiple of any int4 group size \(256, 128, 64, 32\)"),
])
def test_bad_weights_are_refused_with_what_was_expected(call, message):
    with pytest.raises(KernelError, match=message):
        call()


def test_resident_bytes_follow_the_precision():
    weight = torch.randn(256, 512)
    sizes = {p: K.pack_linear(weight, p).nbytes for p in Precision}
    assert sizes[Precision.FP32] == 256 * 512 * 4
    assert sizes[Precision.BF16] == 256 * 512 * 2
    assert 256 * 512 <= sizes[Precision.INT8] < 1.1 * 256 * 512
    # int4: half a byte per weight plus a bf16 scale and zero per group of 32 (0.625 B)
    assert 256 * 512 // 2 <= sizes[Precision.INT4] <= 0.625 * 256 * 512


def test_int4_scales_minimise_the_group_error():
    torch.manual_seed(3)
    weight = torch.randn(64, 256)
    weight[:, 0] *= 8   # one outlier per row makes plain absmax scaling coarse
    codes, scales = K.quantize_int4_groups(weight, 32)
    deq = (codes.float().reshape(64, 8, 32) * scales[:, :, None]).reshape(64, 256)
    absmax = weight.reshape(64, 8, 32).abs().amax(-1, keepdim=True) / 7
    plain = (torch.round(weight.reshape(64, 8, 32) / absmax).clamp(-8, 7) * absmax).reshape(64, 256)
    assert float((deq - weight).norm()) < float((plain - weight).norm())


@pytest.mark.parametrize("offset", [0, 8, 24])
def test_codes_viewed_from_a_loaded_file_are_aligned_before_the_kernel_reads_them(offset):
    # a store's body is loaded as views of one buffer; the batched int8pack path faults on a
    # weight that is not 64-byte aligned
    codes = torch.randint(-127, 128, (128, 64), dtype=torch.int8)
    buffer = bytearray(codes.numel() + 128)
    view = torch.frombuffer(buffer, dtype=torch.int8, count=codes.numel(), offset=offset)
    view = view.view(128, 64)
    view.copy_(codes)
    scales = torch.rand(128) + 0.5
    with K.force_kernel("int8pack-bf16"):
        packed = K.pack_int8_rows(view, scales)
    x = torch.randn(12, 64)
    expected = x @ (codes.float() * scales.to(torch.bfloat16).float()[:, None]).T
    assert torch.allclose(packed(x), expected, atol=2e-2 * float(expected.abs().max()))

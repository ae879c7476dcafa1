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
    if precision is Precision.INT8:
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
            Precision.INT4: 0.15}[kernel.precision]
    assert float((y - exact).norm() / exact.norm()) < loss


@pytest.mark.parametrize("cpu,precision,expected", [
    (X86_BF16, "int4", "int4pack-bf16"),
    (X86_BF16, "bf16", "bf16-matmul"),
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


def test_int8_prefers_int8pack_and_falls_back_to_dequantising():
    names = K.kernel_names("int8")
    assert names[0] == "int8pack-bf16" and names[-1] == "int8-dequant"
    assert K.select_kernel("int8", ODD).name == "int8-dequant"


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

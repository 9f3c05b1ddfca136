"""The Triton kernels lower to H100 (sm_90) code without a GPU: Triton's own compiler and the bundled ptxas.

The interpreter tests prove the arithmetic; this proves the kernels compile for Hopper, use wgmma
(tensor cores) and a cp.async software pipeline when the JIT's usual specialisations hold (unit inner
strides, 16-divisible pointers and sizes). It runs in a subprocess: the interpreter flag set by
test_triton_logprobs.py must not apply here.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import json
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sapo.ops import triton_logprobs as ops

    DIVISIBLE = ("stride_hn", "stride_wv", "stride_zn", "stride_on", "D", "V", "cols_per_split")

    def compile_kernel(fn, types, constexprs, options):
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            signature[name] = "constexpr" if name in constexprs else types.get(name, "i32")
            if name not in constexprs and (name.endswith("_ptr") or name in DIVISIBLE):
                attrs[(i,)] = [["tt.divisibility", 16]]
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                options=options)
        ptx = kernel.asm["ptx"]
        return dict(wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async"),
                    shared=kernel.metadata.shared)

    tiles = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64)
    options = dict(num_warps=8, num_stages=3)
    common = dict(stride_hd=1, stride_wd=1, DOT_PRECISION="ieee", DOT_UPCAST=False, HAS_BIAS=False, **tiles)
    pointers = dict(hidden_ptr="*bf16", weight_ptr="*bf16", bias_ptr="*fp32", labels_ptr="*i64",
                    logits_ptr="*fp32", inv_temperature="fp32")
    stats = compile_kernel(
        ops._stats_kernel,
        dict(pointers, max_ptr="*fp32", sumexp_ptr="*fp32", zsum_ptr="*fp32", label_ptr="*fp32"),
        dict(common, WITH_ENTROPY=True, STORE_LOGITS=False), options)
    dlogits = compile_kernel(
        ops._dlogits_kernel,
        dict(pointers, lse_ptr="*fp32", grad_logp_ptr="*fp32", grad_entropy_ptr="*fp32", entropy_ptr="*fp32",
             out_ptr="*bf16"),
        dict(common, HAS_GRAD_LOGP=True, HAS_GRAD_ENTROPY=True, RECOMPUTE=True), options)
    print(json.dumps(dict(stats=stats, dlogits=dlogits)))
    """
)


def test_kernels_compile_for_h100_with_tensor_cores_and_pipelining():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    stage_bytes = (64 * 64 + 64 * 128) * 2  # one bf16 hidden tile + one weight tile
    for name in ("stats", "dlogits"):
        assert result[name]["wgmma"] > 0, (name, result)  # Hopper tensor-core MMA
        assert result[name]["cp_async"] > 0, (name, result)  # asynchronous, pipelined loads
        assert result[name]["shared"] >= 3 * stage_bytes, (name, result)  # three stages in shared memory

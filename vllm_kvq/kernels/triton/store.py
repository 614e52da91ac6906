"""Quantize-on-write: one pass reads K and V, rotates, normalizes, quantizes, bit-packs and scatters the
packed slots by ``slot_mapping``. One launch per head group of the format (mixed formats: one per group),
each compiled for its group's codecs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvq.kernels.triton import codec_jit as cj
from vllm_kvq.kernels.triton.codec_spec import heads_tensor, spec_of, tables
from vllm_kvq.kv_format import KVFormat


@triton.jit
def _store_kernel(k_ptr, skn, skh, v_ptr, svn, svh,
                  cache_ptr, sB, sH, sT, sC, slot_ptr, heads_ptr, N,
                  krt_ptr, kcent_ptr, kthr_ptr, vrt_ptr, vcent_ptr, vthr_ptr,
                  D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, RC: tl.constexpr,
                  VOFF: tl.constexpr, PAD0: tl.constexpr, PADP: tl.constexpr, SLOT: tl.constexpr,
                  K_KIND: tl.constexpr, K_B0: tl.constexpr, K_N0: tl.constexpr, K_B1: tl.constexpr,
                  K_SEG1: tl.constexpr, K_META: tl.constexpr, K_GS: tl.constexpr, K_W: tl.constexpr,
                  K_ROT: tl.constexpr, K_SMODE: tl.constexpr,
                  V_KIND: tl.constexpr, V_B0: tl.constexpr, V_N0: tl.constexpr, V_B1: tl.constexpr,
                  V_SEG1: tl.constexpr, V_META: tl.constexpr, V_GS: tl.constexpr, V_W: tl.constexpr,
                  V_ROT: tl.constexpr, V_SMODE: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    h = tl.load(heads_ptr + tl.program_id(1)).to(tl.int64)
    slot = tl.load(slot_ptr + n, mask=n < N, other=-1).to(tl.int64)
    nmask = slot >= 0
    slot = tl.where(nmask, slot, 0)
    rows = cache_ptr + (slot // T) * sB + h * sH + (slot % T) * sT
    d = tl.arange(0, DP)
    xm = nmask[:, None] & (d[None, :] < D)
    n64 = n.to(tl.int64)[:, None]
    src = k_ptr + n64 * skn + h * skh
    x = tl.load(src + d[None, :], mask=xm, other=0.0).to(tl.float32)
    cj.encode_store(x, src, rows, nmask, sC, D, krt_ptr, kcent_ptr, kthr_ptr, DP, BN, RC,
                    K_KIND, K_B0, K_N0, K_B1, K_SEG1, K_META, K_GS, K_W, K_ROT, K_SMODE)
    src = v_ptr + n64 * svn + h * svh
    x = tl.load(src + d[None, :], mask=xm, other=0.0).to(tl.float32)
    cj.encode_store(x, src, rows + VOFF * sC, nmask, sC, D, vrt_ptr, vcent_ptr, vthr_ptr, DP, BN, RC,
                    V_KIND, V_B0, V_N0, V_B1, V_SEG1, V_META, V_GS, V_W, V_ROT, V_SMODE)
    if PAD0 < SLOT:
        # The reference writes whole slots: zero the padding so pages compare (and hash) byte for byte.
        p = PAD0 + tl.arange(0, PADP)
        tl.store(rows[:, None] + p[None, :] * sC, tl.zeros((BN, PADP), tl.uint8),
                 mask=nmask[:, None] & (p[None, :] < SLOT))


def store(key: torch.Tensor,  # (N, Hk, D)
          value: torch.Tensor,  # (N, Hk, D)
          cache: torch.Tensor,  # (B, Hk, T, C) uint8, any strides
          slot_mapping: torch.Tensor,  # (N,) int; -1 = padding, skipped
          fmt: KVFormat) -> None:
    n = slot_mapping.shape[0]
    if n == 0:
        return
    d = fmt.head_size
    dp = max(16, triton.next_power_of_2(d))
    bn = 16
    t = cache.shape[2]
    slot_mapping = slot_mapping.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    for g in fmt.groups:
        ks, vs = spec_of(g.key), spec_of(g.value)
        krt, kcent, kthr = tables(g.key, cache.device)
        vrt, vcent, vthr = tables(g.value, cache.device)
        heads = heads_tensor(g.heads, cache.device)
        pad0 = g.key.nbytes + g.value.nbytes
        _store_kernel[(triton.cdiv(n, bn), len(g.heads))](
            key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1), cache, *cache.stride(), slot_mapping, heads, n,
            krt, kcent, kthr, vrt, vcent, vthr,
            D=d, DP=dp, BN=bn, T=t, RC=min(32, dp), VOFF=g.key.nbytes, PAD0=pad0,
            PADP=max(1, triton.next_power_of_2(fmt.slot_bytes - pad0)), SLOT=fmt.slot_bytes,
            **ks.constexprs("K"), **vs.constexprs("V"), num_warps=8 if dp >= 128 else 4)

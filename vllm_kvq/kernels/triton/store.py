"""Quantize-on-write: one pass reads K and V, applies each head's state transform, rotates, and hands the
rows to the codec's ``encode`` hook, which quantizes, bit-packs and scatters them by ``slot_mapping``.
One launch per head group of the format (mixed formats: one per group), each compiled for its group's
codec hooks; the kernel itself knows no codec."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvq.kernels import heads_tensor
from vllm_kvq.kernels.triton import common as cm
from vllm_kvq.kv_format import KVFormat


@triton.jit
def _encode_side(src, rows, nmask, sC, D, rt_ptr, tab0, tab1, sub_ptr, fac_ptr,
                 DP: tl.constexpr, BN: tl.constexpr, RC: tl.constexpr,
                 ENC: tl.constexpr, P: tl.constexpr, ROT: tl.constexpr, SUB: tl.constexpr, FAC: tl.constexpr):
    d = tl.arange(0, DP)
    dm = d < D
    x = tl.load(src + d[None, :], mask=nmask[:, None] & dm[None, :], other=0.0).to(tl.float32)
    x = cm.transform(x, d, dm, sub_ptr, fac_ptr, SUB, FAC, True)
    if ROT:
        y = cm.rotate_rows(src, nmask, rt_ptr, D, DP, BN, RC, sub_ptr, fac_ptr, SUB, FAC, True)
    else:
        y = x
    ENC(x, y, rows, nmask, sC, D, tab0, tab1, DP, BN, P)
    return y


@triton.jit
def _store_kernel(k_ptr, skn, skh, v_ptr, svn, svh,
                  cache_ptr, sB, sH, sT, sC, slot_ptr, heads_ptr, N,
                  k_rt, k_tab0, k_tab1, k_sub, k_fac, v_rt, v_tab0, v_tab1, v_sub, v_fac,
                  D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, RC: tl.constexpr,
                  VOFF: tl.constexpr, PAD0: tl.constexpr, PADP: tl.constexpr, SLOT: tl.constexpr,
                  SINK: tl.constexpr, SOFF: tl.constexpr, SB: tl.constexpr,
                  K_ENC: tl.constexpr, K_P: tl.constexpr, K_ROT: tl.constexpr, K_SUB: tl.constexpr,
                  K_FAC: tl.constexpr,
                  V_ENC: tl.constexpr, V_P: tl.constexpr, V_ROT: tl.constexpr, V_SUB: tl.constexpr,
                  V_FAC: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    gh = tl.program_id(1)  # head within the group: row of the stacked state
    h = tl.load(heads_ptr + gh).to(tl.int64)
    slot = tl.load(slot_ptr + n, mask=n < N, other=-1).to(tl.int64)
    nmask = slot >= 0
    slot = tl.where(nmask, slot, 0)
    rows = cache_ptr + (slot // T) * sB + h * sH + (slot % T) * sT
    n64 = n.to(tl.int64)[:, None]
    yk = _encode_side(k_ptr + n64 * skn + h * skh, rows, nmask, sC, D, k_rt, k_tab0, k_tab1, k_sub + gh * D,
                      k_fac + gh * D, DP, BN, RC, K_ENC, K_P, K_ROT, K_SUB, K_FAC)
    yv = _encode_side(v_ptr + n64 * svn + h * svh, rows + VOFF * sC, nmask, sC, D, v_rt, v_tab0, v_tab1,
                      v_sub + gh * D, v_fac + gh * D, DP, BN, RC, V_ENC, V_P, V_ROT, V_SUB, V_FAC)
    if PAD0 < SLOT:
        # The reference writes whole slots: zero the padding so pages compare (and hash) byte for byte. The
        # sink area [SOFF, SOFF + SB) belongs to the block, not to this slot: it is left alone.
        p = PAD0 + tl.arange(0, PADP)
        pm = (p < SLOT) & ((p < SOFF) | (p >= SOFF + SB)) if SINK > 0 else p < SLOT
        tl.store(rows[:, None] + p[None, :] * sC, tl.zeros((BN, PADP), tl.uint8), mask=nmask[:, None] & pm[None, :])
    if SINK > 0:
        off = slot % T
        smask = nmask & (off < SINK)
        blockrow = rows - off * sT
        cm.store_sink(blockrow, off, smask, yk, 0, sT, sC, D, DP, SOFF, SB)
        cm.store_sink(blockrow, off, smask, yv, 1, sT, sC, D, DP, SOFF, SB)


def side_args(group, side: str, device) -> tuple[list, dict, object]:
    """(pointer arguments: rotation, two tables, stacked shift, stacked scale; constexprs prefixed "K_" or
    "V_"; the codec's hooks) of one side of a head group, for the generic kernels. Unbound state gets a
    placeholder pointer that the kernels never read."""
    codec = group.key if side == "k" else group.value
    hooks = codec.triton_hooks()
    rt, t0, t1 = codec.tables(device)
    sub, fac = group.state(side, "shift", device), group.state(side, "scale", device)
    ptrs = [rt, t0, t1, t0 if sub is None else sub, t0 if fac is None else fac]
    p = side.upper()
    consts = {f"{p}_P": hooks.params, f"{p}_ROT": codec.rotation.kind != "identity",
              f"{p}_SUB": sub is not None, f"{p}_FAC": fac is not None}
    return ptrs, consts, hooks


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
        kp, kc, kh = side_args(g, "k", cache.device)
        vp, vc, vh = side_args(g, "v", cache.device)
        heads = heads_tensor(g.heads, cache.device)
        pad0 = g.key.nbytes + g.value.nbytes
        _store_kernel[(triton.cdiv(n, bn), len(g.heads))](
            key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1), cache, *cache.stride(),
            slot_mapping, heads, n, *kp, *vp,
            D=d, DP=dp, BN=bn, T=t, RC=min(32, dp), VOFF=g.key.nbytes, PAD0=pad0,
            PADP=max(1, triton.next_power_of_2(fmt.slot_bytes - pad0)), SLOT=fmt.slot_bytes,
            SINK=fmt.sink_tokens, SOFF=fmt.sink_offset, SB=max(1, fmt.sink_bytes),
            K_ENC=kh.encode, V_ENC=vh.encode, **kc, **vc, num_warps=8)

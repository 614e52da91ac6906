"""Compile checks of csrc/ where nothing CUDA can run: the framework-agnostic kernels with plain nvcc, the torch
binding's syntax against the installed torch headers, and the contract between the two sides."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
BINDING = CUDA_DIR / "torch_bindings.cpp"
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
AGNOSTIC = sorted(p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h"))


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 "/usr/local/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def test_there_are_kernel_sources():
    assert KERNEL_SOURCES, "csrc/cuda has no .cu files"
    assert BINDING.exists()


@pytest.mark.parametrize("path", AGNOSTIC, ids=lambda p: p.name)
def test_kernel_files_are_framework_agnostic(path):
    text = path.read_text()
    bad = re.findall(r'#include\s*[<"]((?:torch|ATen|c10|pybind11|Python)[^>"]*)[>"]', text)
    assert not bad, f"{path.name} includes framework headers {bad}; only torch_bindings.cpp may"


@pytest.mark.parametrize("src", KERNEL_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles_kernels(src, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-std=c++17", "-arch=sm_90", "-O3", "-Xptxas", "-v", "-c", str(src), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    # A kernel that spills registers to local memory is a performance bug, not a style issue.
    spills = [ln for ln in res.stderr.splitlines() if re.search(r"[1-9]\d* bytes spill (stores|loads)", ln)]
    assert not spills, "\n".join(spills)
    warnings = [ln for ln in res.stderr.splitlines() if "warning" in ln and "csrc" in ln]
    assert not warnings, "\n".join(warnings)


def _torch_include() -> Path | None:
    try:
        import torch
    except ImportError:
        return None
    inc = Path(torch.__file__).parent / "include"
    return inc if (inc / "c10" / "cuda" / "CUDAStream.h").exists() else None


@pytest.mark.slow
def test_torch_binding_syntax(tmp_path):
    """The binding cannot be built against CPU torch, but its syntax and the torch API it calls can be checked:
    CPU wheels ship the c10/cuda headers, minus one generated file that an empty stub replaces."""
    inc, gxx = _torch_include(), shutil.which("g++")
    cuda_inc = next((Path(p) for p in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"),
                                        "/usr/local/cuda/include") if Path(p, "cuda_runtime_api.h").exists()), None)
    if inc is None or gxx is None or cuda_inc is None:
        pytest.skip("needs torch headers with c10/cuda, g++ and the CUDA runtime headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not (inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [gxx, "-std=c++20", "-fsyntax-only", f"-I{tmp_path}", f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}",
           f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}", f"-I{CUDA_DIR}", str(BINDING)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


def _caller_arg_counts() -> dict[str, int]:
    """Arguments vllm_kvq/kernels/cuda.py passes to each torch.ops.vllm_kvq op; a starred ``_side_args(...)``
    counts as the list it returns for a real head group."""
    import ast

    from vllm_kvq import codecs
    from vllm_kvq.kernels import cuda as kcuda
    from vllm_kvq.kv_format import KVFormat

    c = codecs.get("turboquant3", head_dim=64)
    side = len(kcuda._side_args(KVFormat(64, [c], [c]).groups[0], "k", "cpu"))
    tree = ast.parse((ROOT / "vllm_kvq" / "kernels" / "cuda.py").read_text())
    counts = {}
    for node in ast.walk(tree):
        f = getattr(node, "func", None)
        if isinstance(node, ast.Call) and isinstance(f, ast.Attribute) and ast.unparse(f.value) == "torch.ops.vllm_kvq":
            counts[f.attr] = sum(side if isinstance(a, ast.Starred) else 1 for a in node.args)
    return counts


def test_binding_schema_matches_python_caller():
    """The op schemas in the binding take the arguments vllm_kvq/kernels/cuda.py passes, in that number."""
    text = BINDING.read_text().replace('"\n      "', "").replace('" "', "")
    counts = _caller_arg_counts()
    for op in ("tq_store", "tq_decode"):
        schema = re.search(rf'"{op}\((.*?)\) -> \(\)"', text, re.S)
        assert schema, f"no schema for {op}"
        n_schema = len(schema.group(1).split(","))
        assert op in counts, f"cuda.py does not call {op}"
        assert n_schema == counts[op], f"{op}: schema has {n_schema} arguments, cuda.py passes {counts[op]}"


def test_codec_spec_order_matches_binding():
    """``cuda.codec_spec``'s docstring names the order the binding unpacks, and the values follow it."""
    from vllm_kvq import codecs
    from vllm_kvq.kernels import cuda as kcuda

    text = BINDING.read_text()
    fields = re.findall(r"c\.(\w+) = static_cast<int>\(spec\[(\d+)\]\)", text)
    order = [f for f, _ in sorted(fields, key=lambda x: int(x[1]))]
    assert order == ["b0", "n0", "b1", "seg1", "meta", "w", "rotate", "scale_mode", "kind", "block"]
    assert "[" + ", ".join(order) + "]" in kcuda.codec_spec.__doc__
    c = codecs.get("turboquant", head_dim=128, bits=2.5, scale_mode="corrected")
    assert kcuda.codec_spec(c) == [3, 64, 2, 24, 40, 8, 1, 1, kcuda.KIND_TURBOQUANT, 1]
    f = codecs.get("fibquant", head_dim=128, bits=2.25, block=4, scale_mode="norm")  # 32 codes of 9 bits
    assert kcuda.codec_spec(f) == [9, 32, 9, 36, 36, 512, 1, 0, kcuda.KIND_FIBQUANT, 4]


def test_python_constants_match_the_headers():
    """The kinds and the FibQuant table limit cuda.py declines by are the ones the kernels use."""
    from vllm_kvq.kernels import cuda as kcuda

    text = (CUDA_DIR / "tq_params.h").read_text()
    assert f"kKindTurboQuant = {kcuda.KIND_TURBOQUANT}, kKindFibQuant = {kcuda.KIND_FIBQUANT}" in text
    limit = re.search(r"kFibTableMaxBytes = (\d+) \* 1024", text)
    assert limit and int(limit.group(1)) * 1024 == kcuda.FIB_TABLE_MAX_BYTES


# ---------------------------------------------------------------------------------------- CPU emulation
# The CUDA kernels run on the CPU: one std::thread per CUDA thread, std::barrier for __syncthreads and
# __syncwarp, a per-warp exchange buffer for shuffles, blocks one after another (so __shared__ can be
# static), and host stand-ins for the few CUDA headers the kernels include. This checks the kernels' logic
# (indexing, packing, softmax merging, split-K) against the reference where no GPU exists; it does not check
# GPU-only behaviour (memory model, occupancy, speed).

_EMU_HEADERS = {'cuda_runtime_api.h': '#pragma once\ntypedef int cudaError_t;\ntypedef void* cudaStream_t;\nenum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };\n', 'math_constants.h': '#pragma once\n#include <limits>\n#define CUDART_INF_F std::numeric_limits<float>::infinity()\n', 'cuda_fp16.h': '#pragma once\n#include <cstdint>\n#include <cstring>\ntypedef _Float16 __half;\ninline float __half2float(__half h) { return (float)h; }\ninline __half __float2half_rn(float f) { return (__half)f; }\ninline __half __ushort_as_half(uint16_t b) { __half h; std::memcpy(&h, &b, 2); return h; }\ninline uint16_t __half_as_ushort(__half h) { uint16_t b; std::memcpy(&b, &h, 2); return b; }\n', 'cuda_bf16.h': '#pragma once\n#include <cstdint>\n#include <cstring>\nstruct __nv_bfloat16 { uint16_t x; };\ninline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = (uint32_t)b.x << 16; float f; std::memcpy(&f, &u, 4); return f; }\ninline __nv_bfloat16 __float2bfloat16_rn(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7FFF + ((u >> 16) & 1); return {(uint16_t)(u >> 16)}; }\ninline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }\ninline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return {x}; }\n'}

_EMU_HARNESS = r"""// Runs the CUDA kernels on the CPU: one std::thread per CUDA thread, barriers for __syncthreads/__syncwarp,
// a per-warp exchange buffer for shuffles. Blocks run one after another (so __shared__ can be static).
#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define KVQ_HOST_EMULATION
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
static std::unique_ptr<std::barrier<>> g_block_bar;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp_bar;
static float g_shfl[64][32];
static float g_dyn[256 * 1024 / 4];  // dynamic shared memory: as much as a launch may ask for
inline float* kvq_emulated_dynamic_smem() { return g_dyn; }
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { g_warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  g_shfl[w][l] = v; __syncwarp(); float r = g_shfl[w][l ^ o]; __syncwarp(); return r;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
using std::exp2f; using std::fmaf; using std::fmaxf; using std::min;
#include "tq_store.cuh"
#include "tq_decode.cuh"

template <class F>
void launch(dim3 grid, int threads, F f) {
  blockDim.x = threads; gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y) for (unsigned x = 0; x < grid.x; ++x) {
    g_block_bar = std::make_unique<std::barrier<>>(threads);
    g_warp_bar.clear();
    for (int w = 0; w < threads / 32; ++w) g_warp_bar.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) ts.emplace_back([=] { threadIdx.x = t; blockIdx = dim3{x, y, z}; f(); });
    for (auto& th : ts) th.join();
  }
}

using namespace kvq;
static TqCodec codec(const long* s, const float* rt, const float* t0, const float* t1) {
  TqCodec c; c.b0 = s[0]; c.n0 = s[1]; c.b1 = s[2]; c.seg1 = s[3]; c.meta = s[4]; c.w = s[5]; c.rotate = s[6];
  c.scale_mode = s[7]; c.kind = s[8]; c.block = s[9]; c.rt = rt; c.tab0 = t0; c.tab1 = t1; return c;
}

// state: k_sub, k_fac, v_sub, v_fac (null = unbound); sink: tokens, offset, bytes.
extern "C" int emu_store(const void* key, const void* value, const long* kstr, int in_dtype, uint8_t* cache,
                         const long* cstr, const int64_t* slots, const int32_t* heads, int gh, int n, int T, int D,
                         int voff, int pad_begin, int slot_bytes, const long* ks, const float* krt, const float* k0,
                         const float* k1, const long* vs, const float* vrt, const float* v0, const float* v1,
                         const float* const* state, const long* sink) {
  StoreParams p;
  p.key = key; p.value = value; p.skn = kstr[0]; p.skh = kstr[1]; p.svn = kstr[2]; p.svh = kstr[3];
  p.in_dtype = (DType)in_dtype; p.cache = cache; p.sB = cstr[0]; p.sH = cstr[1]; p.sT = cstr[2]; p.sC = cstr[3];
  p.slot_mapping = slots; p.heads = heads; p.num_group_heads = gh; p.num_tokens = n; p.block_size = T;
  p.head_dim = D; p.value_offset = voff; p.pad_begin = pad_begin; p.slot_bytes = slot_bytes;
  p.k = codec(ks, krt, k0, k1); p.v = codec(vs, vrt, v0, v1);
  p.ks = SideState{state[0], state[1]}; p.vs = SideState{state[2], state[3]};
  p.sink = Sinks{(int)sink[0], (int)sink[1], (int)sink[2]};
  dim3 grid{(unsigned)((n * gh + kStoreWarps - 1) / kStoreWarps), 1, 1};
  if (D == 64) launch(grid, kStoreWarps * 32, [&] { tq_store_kernel<64>(p); });
  else launch(grid, kStoreWarps * 32, [&] { tq_store_kernel<128>(p); });
  return 0;
}

// Returns the launch's dynamic shared memory in bytes (-1: refused, as tq_decode would).
extern "C" long emu_decode(const void* q, const long* qstr, void* out, int dtype, const uint8_t* cache, const long* cstr,
                           const int32_t* bt, long sbt, const int32_t* seq_lens, const int32_t* qsl, const int32_t* heads,
                           int gh, int S, int N, int HQ, int G, int T, int D, int voff, float scale, int splits,
                           int split_tokens, float* part, float* ml, const long* ks, const float* krt, const float* k0,
                           const float* k1, const long* vs, const float* vrt, const float* v0, const float* v1,
                           const float* const* state, const long* sink) {
  DecodeParams p;
  p.query = q; p.sqn = qstr[0]; p.sqh = qstr[1]; p.out = out; p.son = qstr[2]; p.soh = qstr[3]; p.dtype = (DType)dtype;
  p.cache = cache; p.sB = cstr[0]; p.sH = cstr[1]; p.sT = cstr[2]; p.sC = cstr[3]; p.block_table = bt; p.sbt = sbt;
  p.seq_lens = seq_lens; p.query_start_loc = qsl; p.heads = heads; p.num_group_heads = gh; p.num_seqs = S;
  p.num_tokens = N; p.num_q_heads = HQ; p.group = G; p.block_size = T; p.head_dim = D; p.value_offset = voff;
  p.scale = scale; p.num_splits = splits; p.split_tokens = split_tokens; p.partial = part; p.ml = ml;
  p.k = codec(ks, krt, k0, k1); p.v = codec(vs, vrt, v0, v1);
  p.ks = SideState{nullptr, state[1]}; p.vs = SideState{state[2], state[3]};
  p.sink = Sinks{(int)sink[0], (int)sink[1], (int)sink[2]};
  const long smem = (long)decode_plan(p);
  if (smem < 0 || smem > (long)sizeof(g_dyn)) return -1;
  dim3 grid{(unsigned)S, (unsigned)(gh * p.head_chunks), (unsigned)splits}, mg{(unsigned)N, (unsigned)gh, 1};
  const bool fib = p.k.kind == kKindFibQuant;
  auto run = [&](auto dtag, auto gtag, auto mtag) {
    constexpr int DD = decltype(dtag)::value, GG = decltype(gtag)::value, MG = decltype(mtag)::value;
    if (fib) launch(grid, kDecodeWarps * 32, [&] { fib_decode_kernel<DD, GG>(p); });
    else launch(grid, kDecodeWarps * 32, [&] { tq_decode_kernel<DD, GG>(p); });
    if (splits > 1) launch(mg, kDecodeWarps * 32, [&] { tq_merge_kernel<DD, MG>(p); });
  };
  using I64 = std::integral_constant<int, 64>; using I128 = std::integral_constant<int, 128>;
  using G4 = std::integral_constant<int, 4>; using G8 = std::integral_constant<int, 8>;
  const bool c8 = p.chunk_heads > 4, m8 = G > 4;
  if (D == 64) {
    if (c8) { if (m8) run(I64{}, G8{}, G8{}); else run(I64{}, G8{}, G4{}); }
    else { if (m8) run(I64{}, G4{}, G8{}); else run(I64{}, G4{}, G4{}); }
  } else {
    if (c8) { if (m8) run(I128{}, G8{}, G8{}); else run(I128{}, G8{}, G4{}); }
    else { if (m8) run(I128{}, G4{}, G8{}); else run(I128{}, G4{}, G4{}); }
  }
  return smem;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    d = tmp_path_factory.mktemp("emu")
    (d / "inc").mkdir()
    for name, text in _EMU_HEADERS.items():
        (d / "inc" / name).write_text(text)
    (d / "harness.cpp").write_text(_EMU_HARNESS)
    res = subprocess.run([gxx, "-std=c++20", "-O1", "-shared", "-fPIC", f"-I{d / 'inc'}", f"-I{CUDA_DIR}",
                          str(d / "harness.cpp"), "-o", str(d / "libemu.so"), "-lpthread"],
                         capture_output=True, text=True, timeout=600)
    if res.returncode and "barrier" in res.stderr and "error" in res.stderr and "std::barrier" in res.stderr:
        pytest.skip("this g++ has no std::barrier")
    assert res.returncode == 0, res.stderr[-4000:]
    return ctypes.CDLL(str(d / "libemu.so"))


def _emu_fns(lib):
    """Python callers of the emulated kernels, shaped like vllm_kvq/kernels/cuda.py's calls (same specs, tables,
    stacked state and sink numbers)."""
    import torch

    from vllm_kvq.kernels import cuda as kcuda

    dtypes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    keep = []  # tensors whose pointers a call holds

    def ptr(t):
        if t is None:
            return None
        keep.append(t)
        return ctypes.c_void_p(t.data_ptr())

    def longs(*v):
        return (ctypes.c_long * len(v))(*v)

    def codec_args(c):
        rt, t0, t1 = c.tables("cpu")
        return [longs(*kcuda.codec_spec(c)), ptr(rt), ptr(t0), ptr(t1)]

    def state(g, decode):
        ts = [None if decode else g.state("k", "shift", "cpu"), g.state("k", "scale", "cpu"),
              g.state("v", "shift", "cpu"), g.state("v", "scale", "cpu")]
        return (ctypes.c_void_p * 4)(*[None if t is None else ptr(t).value for t in ts])

    def sink(fmt):
        return longs(fmt.sink_tokens, fmt.sink_offset, fmt.sink_bytes)

    def emu_store(k, v, cache, slots, fmt):
        for g in fmt.groups:
            heads = torch.tensor(g.heads, dtype=torch.int32)
            lib.emu_store(ptr(k), ptr(v), longs(k.stride(0), k.stride(1), v.stride(0), v.stride(1)), dtypes[k.dtype],
                          ptr(cache), longs(*cache.stride()), ptr(slots), ptr(heads), len(g.heads), k.shape[0],
                          cache.shape[2], fmt.head_size, g.key.nbytes, g.key.nbytes + g.value.nbytes, fmt.slot_bytes,
                          *codec_args(g.key), *codec_args(g.value), state(g, False), sink(fmt))

    lib.emu_decode.restype = ctypes.c_long

    def emu_decode(q, cache, bt, sl, qsl, fmt, scale, splits):
        n, hq, d = q.shape
        out = torch.zeros_like(q)
        split_tokens = -(-bt.shape[1] * cache.shape[2] // splits)
        part, ml = torch.zeros(splits, n, hq, d), torch.zeros(splits, n, hq, 2)
        smem = []
        for g in fmt.groups:
            heads = torch.tensor(g.heads, dtype=torch.int32)
            smem.append(lib.emu_decode(
                ptr(q), longs(q.stride(0), q.stride(1), out.stride(0), out.stride(1)), ptr(out), dtypes[q.dtype],
                ptr(cache), longs(*cache.stride()), ptr(bt), ctypes.c_long(bt.stride(0)), ptr(sl), ptr(qsl), ptr(heads),
                len(g.heads), sl.shape[0], n, hq, hq // fmt.num_kv_heads, cache.shape[2], d, g.key.nbytes,
                ctypes.c_float(scale), splits, split_tokens, ptr(part), ptr(ml), *codec_args(g.key),
                *codec_args(g.value), state(g, True), sink(fmt)))
        keep.clear()
        assert min(smem) >= 0, "the launcher refused a format cuda.why_not accepts"
        return out

    return emu_store, emu_decode


def _emu_format(case: str):
    """(format, query heads) of an emulated case: matrix codecs (tests/codec_cases.py, per-head state as the
    matrix binds it), optionally with sink records."""
    from tests import codec_cases
    from vllm_kvq import codecs
    from vllm_kvq.kv_format import KVFormat

    table = {  # case -> (matrix case ids for K and V, head size, KV heads, query heads, sink tokens, block size)
        "tq3-d64-gqa3": ("turboquant3", "turboquant3", 64, 2, 6, 0, 8),
        "tq2.5-d128": ("turboquant2.5", "turboquant2.5", 128, 1, 4, 0, 8),
        "tq4-d64-gqa8": ("turboquant4", "turboquant4", 64, 1, 8, 0, 8),
        "tq3+state-d64": ("turboquant3+shift+scale", "turboquant3+shift+scale", 64, 2, 4, 0, 8),
        "tq2.5+shift-sinks-d128": ("turboquant2.5+shift", "turboquant2.5+shift", 128, 2, 4, 2, 8),
        "fib2-d64-gqa3": ("fibquant2", "fibquant2", 64, 2, 6, 0, 8),
        "fib2+state-sinks-d64-gqa8": ("fibquant2+shift+scale", "fibquant2+shift+scale", 64, 1, 8, 3, 8),
        "fib0.75-d128": ("fibquant0.75", "fibquant0.75", 128, 1, 2, 0, 8),
        "fib3-d128-gqa4": ("fibquant3", "fibquant2.5", 128, 1, 4, 0, 8),  # 64 codes: two per lane
        "fib3-k-tq3-v-d64": ("fibquant3", "turboquant3", 64, 2, 4, 0, 8),
        "tq4-k-fib1.75-v-d64": ("turboquant4", "fibquant1.75", 64, 1, 3, 1, 16),
        "fib2.25-k4-d64": ("fib2.25-k4", "fib2-norm", 64, 1, 4, 0, 8),
        "fib2.5-k4-d128-chunked": ("fib2.5-k4", "fib2.5-k4", 128, 1, 3, 0, 8),  # 128 KiB table: 1 head per block
    }
    if case == "mixed-d64":  # two head groups with different codecs and slot sizes, and a non-default scale mode
        g = lambda n, **p: codecs.get(n, head_dim=64, **p)  # noqa: E731
        return KVFormat(64, [g("turboquant3"), g("turboquant", bits=4, scale_mode="norm")],
                        [g("turboquant2.5"), g("turboquant3")]), 4, 8
    kid, vid, d, hk, hq, sinks, t = table[case]
    ks = [codec_cases.case(kid).build(d, h) for h in range(hk)]
    vs = [codec_cases.case(vid).build(d, h + 7) for h in range(hk)]
    return KVFormat(d, ks, vs, name=case, sink_tokens=sinks, block_size=t if sinks else None), hq, t


EMU_CASES = ["tq3-d64-gqa3", "tq2.5-d128", "tq4-d64-gqa8", "mixed-d64", "tq3+state-d64", "tq2.5+shift-sinks-d128",
             "fib2-d64-gqa3", "fib2+state-sinks-d64-gqa8", "fib0.75-d128", "fib3-d128-gqa4", "fib3-k-tq3-v-d64",
             "tq4-k-fib1.75-v-d64",
             "fib2.25-k4-d64", "fib2.5-k4-d128-chunked"]


@pytest.mark.parametrize("case", EMU_CASES)
def test_cuda_kernels_emulated_on_cpu(emulator, case):
    """Store bytes (the kernel_checks rule: exact, or a code flipped on a tie) and decode against the reference,
    with and without split-K, for TurboQuant and FibQuant, per-head state and sink records."""
    import torch

    from tests.kernel_checks import check_cache
    from vllm_kvq.kernels import cuda as kcuda
    from vllm_kvq.ops import reference
    from vllm_kvq.testing import random_paged_batch

    emu_store, emu_decode = _emu_fns(emulator)
    gen = torch.Generator().manual_seed(7)
    fmt, hq, t = _emu_format(case)
    assert kcuda.why_not(fmt, "store") is None
    assert kcuda.why_not(fmt, "paged_attention", True, hq // fmt.num_kv_heads) is None
    d, hk = fmt.head_size, fmt.num_kv_heads
    n, blocks = 12, 4
    k = torch.randn(n, hk, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(n, hk, d, generator=gen).to(torch.bfloat16)
    k[1, 0] = 0.0  # a zero vector: norm 0
    perm = torch.randperm(blocks * t, generator=gen)
    # distinct slots, the first two at block offsets 0 and 1 (sink positions when the format has them)
    slots = torch.cat((torch.tensor([0, 1]), perm[perm > 1][: n - 2]))
    slots[3] = -1
    got = torch.zeros(blocks, t, hk, fmt.slot_bytes, dtype=torch.uint8).permute(0, 2, 1, 3)  # strided view
    want = fmt.allocate(blocks, t)
    got.fill_(7)
    want.fill_(7)
    emu_store(k, v, got, slots, fmt)
    reference.store(k, v, want, slots, fmt)
    check_cache(fmt, k.float(), v.float(), slots, got, want)
    batch = random_paged_batch([37, 9], [1, 1], t, generator=gen)
    total = int(batch.seq_lens.sum())
    cache = fmt.allocate(batch.num_blocks, t)
    reference.store(torch.randn(total, hk, d, generator=gen), torch.randn(total, hk, d, generator=gen), cache,
                    batch.ctx_slots, fmt)
    q = torch.randn(2, hq, d, generator=gen)
    args = (cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt)
    ref = reference.paged_attention(q, *args, scale=d ** -0.5)
    tol = 2e-5 * max(1.0, ref.abs().max().item())
    for splits in (1, 3):
        out = emu_decode(q, *args, d ** -0.5, splits)
        assert (out - ref).abs().max().item() < tol, f"splits={splits}: {(out - ref).abs().max().item()}"
    out16 = emu_decode(q.to(torch.bfloat16), *args, d ** -0.5, 2)
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - ref).abs().max().item() < 2e-2 * max(1.0, ref.abs().max().item())

"""Codecs: one matrix over every registered name (adding a codec adds a row), then the quality targets of
the issue on the reference (distortion vs Lloyd-Max, packed size), then the shared math: bit packing,
rotations, Lloyd-Max codebooks, the registry."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from vllm_kvq import codecs
from vllm_kvq.codecs import lloyd_max
from vllm_kvq.codecs.packing import pack_bits, packed_nbytes, unpack_bits
from vllm_kvq.codecs.rotation import fwht, make_rotation
from vllm_kvq.testing import relative_mse

from tests import codec_cases

# Families need parameters to be built; a new family without an entry here fails test_every_name_builds,
# which is the point: every registered name is exercised.
FAMILY_EXAMPLES = {
    "fibquant": {"bits": 1.25, "block": 4, "scale_mode": "norm"},
    "raw": {"dtype": "fp16"},
    "turboquant": {"bits": 3.5, "scale_mode": "norm"},
    "uniform": {"bits": 3, "group_size": 16, "rotate": True},
}
HEAD_DIMS = [64, 80, 128]


def build(name: str, d: int, **kw) -> codecs.VectorCodec:
    params = dict(FAMILY_EXAMPLES.get(name, {}), **kw)
    return codecs.get(name, head_dim=d, **params)


@pytest.mark.parametrize("name", codecs.names())
def test_every_name_builds(name):
    try:
        build(name, 64)
    except TypeError as e:
        pytest.fail(f"{name} is a family: add example parameters to FAMILY_EXAMPLES ({e})")


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("name", codecs.names())
def test_shapes_dtypes_and_layout(name, d, gen):
    c = build(name, d)
    assert c.head_dim == d
    for n in (0, 1, 7):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(n, d, generator=gen).to(dtype)
            codes = c.encode(x)
            assert codes.dtype == torch.uint8 and codes.shape == (n, c.nbytes)
            y = c.decode(codes)
            assert y.dtype == torch.float32 and y.shape == (n, d)
    # fields tile the packed row exactly, in order, and describe() shows each of them
    fields = c.fields()
    assert [f.offset for f in fields] == [sum(f.nbytes for f in fields[:i]) for i in range(len(fields))]
    assert sum(f.nbytes for f in fields) == c.nbytes
    text = c.describe()
    assert all(f.name in text for f in fields) and str(c.nbytes) in text


@pytest.mark.parametrize("name", codecs.names())
def test_deterministic_and_rotated_domain(name, gen):
    d = 128
    c = build(name, d)
    x = torch.randn(64, d, generator=gen) * 3
    codes = c.encode(x)
    assert torch.equal(codes, c.encode(x.clone()))
    # a fresh object with the same parameters (another process) writes the same bytes
    codecs._build.cache_clear()
    make_rotation.cache_clear()
    assert torch.equal(codes, build(name, d).encode(x))
    # encode is row-wise: a row's bytes do not depend on its batch
    assert torch.equal(codes[5:6], c.encode(x[5:6]))
    # decode == unrotate(decode_rotated), and rotate is the orthogonal map the scores use
    torch.testing.assert_close(c.decode(codes), c.unrotate(c.decode_rotated(codes)), atol=1e-5, rtol=1e-5)
    q = torch.randn(8, d, generator=gen)
    torch.testing.assert_close(c.rotate(q) @ c.decode_rotated(codes).T, q @ c.decode(codes).T, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("d", [80, 112])
@pytest.mark.parametrize("name", codecs.names())
def test_decode_from_unaligned_views(name, d, gen):
    # codes read straight out of a cache slot: a V code starts wherever the K code ends (27 bytes for
    # turboquant2.5 at d = 80), and a single row of such a slice is a "contiguous" tensor at an odd offset
    c = build(name, d)
    x = torch.randn(3, d, generator=gen)
    codes = c.encode(x)
    buf = torch.zeros(3, c.nbytes + 5, dtype=torch.uint8)
    buf[:, 1:1 + c.nbytes] = codes
    for rows in (slice(0, 1), slice(0, 3), slice(2, 3)):
        assert torch.equal(c.decode(buf[rows, 1:1 + c.nbytes]), c.decode(codes[rows]))


@pytest.mark.parametrize("name", codecs.names())
def test_zero_and_tiny_vectors_stay_finite(name):
    c = build(name, 64)
    x = torch.zeros(3, 64)
    x[1, 5] = 1e-6
    y = c.decode(c.encode(x))
    assert torch.isfinite(y).all()
    assert torch.equal(y[0], torch.zeros(64))


@pytest.mark.parametrize("name", codecs.names())
def test_input_validation(name):
    c = build(name, 64)
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        c.encode(torch.randn(2, 65))
    with pytest.raises(ValueError, match=rf"uint8 \(N, {c.nbytes}\)"):
        c.decode(torch.zeros(2, c.nbytes + 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected codes uint8"):
        c.decode(torch.zeros(2, c.nbytes, dtype=torch.int8))


def test_seed_changes_rotation_only_where_there_is_one(gen):
    x = torch.randn(16, 128, generator=gen)
    for name, rotated in (("turboquant3", True), ("uniform4", False), ("bf16", False)):
        a, b = codecs.get(name, head_dim=128, seed=0), codecs.get(name, head_dim=128, seed=1)
        assert torch.equal(a.encode(x), b.encode(x)) != rotated, name
    assert not torch.equal(codecs.get("uniform", head_dim=128, bits=4, rotate=True, seed=0).encode(x),
                           codecs.get("uniform", head_dim=128, bits=4, rotate=True, seed=1).encode(x))


# --- quality targets on the reference ----------------------------------------------------------------------

# Lloyd-Max D_mse of a rotated unit vector (FACTS section 6; TurboQuant paper, table of b = 1..4).
PUBLISHED_LLOYD_MAX = {
    128: {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.0093},
    64: {1: 0.3584, 2: 0.1145, 3: 0.0334, 4: 0.0091},
}


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_matches_published(d, bits):
    book = codecs.lloyd_max_codebook(d, bits)
    assert book.mse * d == pytest.approx(PUBLISHED_LLOYD_MAX[d][bits], abs=6e-5)
    c = torch.tensor(book.centroids, dtype=torch.float64)
    assert len(book.centroids) == 2 ** bits and torch.all(c[1:] > c[:-1])
    torch.testing.assert_close(c, -c.flip(0))  # symmetric marginal, symmetric codebook
    thr = torch.tensor(book.thresholds, dtype=torch.float64)
    torch.testing.assert_close(thr, (c[1:] + c[:-1]) / 2)
    # a unit vector's coordinate is ~N(0, 1/d), so the outer centroid scales with 1/sqrt(d)
    # (1 bit: E|t| = sqrt(2 / (pi d)) = 0.8 / sqrt(d))
    assert 0.75 / math.sqrt(d) < c[-1] < 4 / math.sqrt(d)


def test_lloyd_max_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_KVQ_CACHE", str(tmp_path))
    solve = lloyd_max.lloyd_max_codebook.__wrapped__  # past the in-memory cache
    book = solve(96, 3)
    files = list(tmp_path.glob("lloyd_max_*_d96_b3.json"))
    assert len(files) == 1
    assert solve(96, 3) == book  # read back from disk, identical
    files[0].write_text("{not json")
    assert solve(96, 3) == book  # a corrupt file is recomputed, not trusted
    with pytest.raises(ValueError, match="bits in 1..8"):
        solve(64, 9)


N_VECTORS = 100_000  # the target: at least 1e5 vectors
N_SIDE = 30_000  # secondary checks: a per-vector distortion has a std of ~D sqrt(2/d), so the mean's is 0.1 % D


@functools.lru_cache(maxsize=None)
def _distortion(name: str, d: int, n: int = N_VECTORS, **params) -> float:
    # Gaussian rows: uniformly random directions, so the rotated marginal is exactly the designed one.
    # The same rows for every codec (seed 0), so comparisons between codecs are paired.
    codec = codecs.get(name, head_dim=d, **params)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    return relative_mse(x, codec.decode(codec.encode(x)))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_distortion_target(d, bits):
    """E|x - x^|^2 / |x|^2 over 1e5 vectors <= 1.03 x the published Lloyd-Max value (the shipped codec)."""
    dist = _distortion(f"turboquant{bits}", d)
    assert dist <= 1.03 * PUBLISHED_LLOYD_MAX[d][bits], dist


@pytest.mark.parametrize("scale_mode", ["norm", "corrected"])
def test_distortion_other_scale_modes(scale_mode):
    """The paper's estimator ("norm") is at the Lloyd-Max value; "corrected" trades a little on random
    vectors (at 2 bits) for exact norms; the default least-squares scale is never worse than "norm"."""
    d, bits = 128, 2
    lm = PUBLISHED_LLOYD_MAX[d][bits]
    dist = _distortion("turboquant", d, N_SIDE, bits=bits, scale_mode=scale_mode)
    lsq = _distortion("turboquant", d, N_SIDE, bits=bits, scale_mode="lsq")
    if scale_mode == "norm":
        assert 0.98 * lm <= dist <= 1.03 * lm and lsq <= dist
    else:
        assert lm < dist <= 1.06 * lm


@pytest.mark.parametrize("bits", [2.5, 3.5])
def test_fractional_distortion_between_neighbours(bits):
    d = 128
    lo, hi = PUBLISHED_LLOYD_MAX[d][int(bits)], PUBLISHED_LLOYD_MAX[d][int(bits) + 1]
    dist = _distortion(f"turboquant{bits:g}", d, N_SIDE)
    # half the coordinates at each rate: the average of the two distortions
    assert hi < dist <= 1.03 * (lo + hi) / 2, dist


def test_rotation_helps_uniform_codes_on_outlier_channels(gen):
    # two channels 20x the others, as in real keys (FACTS section 7): per-vector min/max spends the levels on
    # them unless a rotation spreads them first
    x = torch.randn(20_000, 128, generator=gen)
    x[:, 3] *= 20
    x[:, 77] *= 20
    plain = relative_mse(x, (c := codecs.get("uniform4", head_dim=128)).decode(c.encode(x)))
    rot = relative_mse(x, (c := codecs.get("uniform", head_dim=128, bits=4, rotate=True)).decode(c.encode(x)))
    assert rot < plain / 2, (rot, plain)


@pytest.mark.parametrize("d", [64, 80, 96, 112, 128, 256])
@pytest.mark.parametrize("bits", [2, 2.5, 3, 3.5, 4])
def test_packed_size_target(d, bits):
    c = codecs.get(f"turboquant{bits:g}", head_dim=d)
    assert c.nbytes - math.ceil(bits * d / 8) in range(0, 5)
    assert c.bits_per_value == bits


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_packed_size(d, bits):
    c = codecs.get("uniform", head_dim=d, bits=bits)
    assert c.nbytes == math.ceil(bits * d / 8) + 4  # one fp16 scale and one fp16 min
    assert codecs.get("uniform", head_dim=d, bits=bits, group_size=32).nbytes == math.ceil(bits * d / 8) + 4 * d // 32


# --- bit packing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n_codes", [1, 3, 7, 13, 64, 65, 128])
def test_pack_round_trip(bits, n_codes, gen):
    codes = torch.randint(0, 2 ** bits, (5, n_codes), generator=gen)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, math.ceil(n_codes * bits / 8))
    assert packed.shape[1] == packed_nbytes(n_codes, bits)
    assert torch.equal(unpack_bits(packed, bits, n_codes), codes)


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_pack_layout_is_a_little_endian_bit_stream(bits, gen):
    # the formula the kernels use (packing.py's docstring): one 16-bit load per code, codes straddle bytes
    codes = torch.randint(0, 2 ** bits, (1, 37), generator=gen)
    p = pack_bits(codes, bits)[0].tolist() + [0]
    for j, code in enumerate(codes[0].tolist()):
        o = j * bits
        assert ((p[o // 8] | p[o // 8 + 1] << 8) >> (o % 8)) & (2 ** bits - 1) == code
    # 3-bit codes really cost 3 bits: 128 of them fill 48 bytes, not 64 nibbles
    assert packed_nbytes(128, 3) == 48


# --- rotations ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,kind", [(64, "hadamard"), (80, "haar"), (96, "haar"), (128, "hadamard")])
def test_rotation_is_orthogonal_and_seeded(d, kind, gen):
    r = make_rotation(d, 3)
    assert r.kind == kind
    m = r.matrix(dtype=torch.float64)
    torch.testing.assert_close(m @ m.T, torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)
    x = torch.randn(10, d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(r.apply(x), x @ m.T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r.inverse(r.apply(x)), x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r.apply(x).norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(make_rotation(d, 4).matrix(), r.matrix())
    assert not torch.allclose(r.matrix(), torch.eye(d), atol=0.1)


def test_hadamard_rotation_is_the_randomized_walsh_hadamard():
    d = 64
    r = make_rotation(d, 0, "hadamard")
    h = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(d)] for i in range(d)], dtype=torch.float64)
    torch.testing.assert_close(r.matrix(dtype=torch.float64), h * r.signs.double()[None, :] / math.sqrt(d))
    assert set(r.signs.tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(fwht(torch.eye(d, dtype=torch.float64)), h)  # Sylvester order, unnormalized
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, 80))
    with pytest.raises(ValueError, match="allowed: auto, hadamard, haar, identity"):
        make_rotation(64, 0, "givens")


# --- registry --------------------------------------------------------------------------------------------------

def test_unknown_name_lists_every_registered_name():
    with pytest.raises(KeyError) as e:
        codecs.get("turboquant5", head_dim=128)
    for name in codecs.names():
        assert name in str(e.value)


def test_registry_rejects_duplicates_and_bad_params():
    before = codecs.names()
    for name in ("turboquant3", "uniform", "bf16"):
        with pytest.raises(ValueError, match="already registered"):
            codecs.register_family(name, codecs.RawCodec, set())
        with pytest.raises(ValueError, match="already registered"):
            codecs.register_preset(name, "raw", dtype="bf16")
    known = ", ".join(codecs.family_names())  # the list comes from the registry itself
    assert {"raw", "turboquant", "uniform"} <= set(codecs.family_names())
    with pytest.raises(ValueError, match=f"unknown codec family 'nope'; known: {known}$"):
        codecs.register_preset("new-name", "nope")
    assert codecs.names() == before
    with pytest.raises(ValueError, match="does not take group_size; allowed: bits, rotation, scale_mode, seed"):
        codecs.get("turboquant3", head_dim=128, group_size=32)


def test_preset_params_and_names():
    assert codecs.get("turboquant3", head_dim=64).bits == 3
    assert codecs.get("turboquant3", head_dim=64, seed=5).name == "turboquant3"
    assert codecs.get("turboquant", head_dim=64, bits=4).name == "turboquant4"
    assert codecs.get("turboquant3", head_dim=64).scale_mode == "lsq"
    # a preset with a changed parameter is a different codec (heads group by key, not name)
    assert codecs.get("turboquant3", head_dim=64, scale_mode="norm").key != codecs.get("turboquant3", head_dim=64).key


# ---- the shared matrix ---------------------------------------------------------------------------------

def test_every_preset_has_a_case():
    presets = {n for n in codecs.names() if n not in codecs.family_names()}
    covered = {c.name for c in codec_cases.CASES}
    assert presets <= covered, f"presets without a case in tests/codec_cases.py: {sorted(presets - covered)}"


@pytest.mark.parametrize("cid", codec_cases.ids())
def test_case_packed_size_and_state(cid, gen):
    case = codec_cases.case(cid)
    for d, want in case.nbytes.items():
        c = case.build(d)
        assert c.nbytes == want and c.state_names == case.state
        x = torch.randn(16, d, generator=gen) * 2 + 1
        codes = c.quantize(x)
        assert codes.shape == (16, want)
        # the state costs no bytes and is undone by dequantize: the error is the codec's on encode's input
        err = relative_mse(x - (c.shift if c.shift is not None else 0), c.dequantize(codes) - (c.shift if c.shift is not None else 0))
        plain = codecs.get(case.name, head_dim=d, **case.params)
        assert torch.equal(codes, plain.encode(c.store_transform(x)))
        assert err < 0.5


def test_bind_validates_and_keys_group_by_state_kind():
    c = codecs.get("turboquant3", head_dim=64)
    with pytest.raises(ValueError, match="scale must be positive"):
        c.bind(scale=torch.zeros(64))
    with pytest.raises(ValueError, match="shift must be 64 finite values"):
        c.bind(shift=torch.zeros(32))
    a, b = c.bind(shift=torch.zeros(64)), c.bind(shift=torch.ones(64))
    assert a.key == b.key != c.key and a.key_params == c.key_params
    assert c.shift is None and a.tables("cpu")[1] is c.tables("cpu")[1]  # tables shared, state per copy
    q = torch.randn(3, 64)
    s = torch.rand(64) + 0.5
    torch.testing.assert_close(c.bind(scale=s).query_transform(q), q * s)
    torch.testing.assert_close(b.output_transform(q), q + 1)

"""MIR (lvlm.mir) against an independent numpy/scipy reference, plus its invariances and errors.

The reference below is deliberately straightforward: np.cov, an explicit lower median, and
float64 scipy.linalg.sqrtm of Sv @ St (PAPERS.md section 1, "The computation").
"""
from __future__ import annotations

import math
import sys
import zlib

import numpy as np
import pytest
import scipy.linalg
import torch

from lvlm.mir import LayerwiseMIR, MIRResult, compute_mir, frechet_distance, ops, preprocess
from lvlm.mir.distance import layer_distance


# ----------------------------------------------------------------------------- reference
def _ref_lower_median(x: np.ndarray) -> np.ndarray:
    """Element (n-1)//2 of the sorted values along axis 0."""
    return np.sort(x, axis=0)[(x.shape[0] - 1) // 2]


def _ref_outliers(rows: np.ndarray) -> np.ndarray:
    norms = np.sqrt((rows ** 2).sum(axis=1))
    m = _ref_lower_median(norms)
    sd = np.std(norms, ddof=1)
    out = rows.copy()
    out[np.abs(norms - m) > 3 * sd] = _ref_lower_median(rows)
    return out


def _ref_fd(v: np.ndarray, t: np.ndarray, replace: bool = True, cross: str = "exact") -> float:
    v = np.asarray(v, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    a = 1.0 / np.mean(np.sqrt((t ** 2).sum(axis=1)))
    v, t = v * a, t * a
    if replace:
        v, t = _ref_outliers(v), _ref_outliers(t)
    sv, st = np.cov(v, rowvar=False), np.cov(t, rowvar=False)
    prod = sv @ st
    if cross == "exact":
        c = float(np.real(np.trace(scipy.linalg.sqrtm(prod))))
    else:
        c = float(np.trace(prod))
    diff = v.mean(0) - t.mean(0)
    return float(diff @ diff + np.trace(sv) + np.trace(st) - 2 * c)


def _ref_mir(vs, ts, replace: bool = True, cross: str = "exact") -> float:
    return math.log10(sum(_ref_fd(v, t, replace, cross) for v, t in zip(vs, ts)))


# ----------------------------------------------------------------------------- data
def _layers(seed: int, n_layers: int, r: int, s: int, d: int, rank_v: int | None = None):
    """Anisotropic, shifted random hidden states: lists of vision [r, d] and text [s, d] arrays."""
    rng = np.random.default_rng(seed)
    vs, ts = [], []
    for _ in range(n_layers):
        scales = np.exp(rng.normal(0, 1, d))                            # [d] anisotropy
        if rank_v is None:
            v = rng.normal(0, 1, (r, d)) * scales + rng.normal(0, 2, d)
        else:                                                           # rows in a rank_v-dim subspace
            v = rng.normal(0, 1, (r, rank_v)) @ rng.normal(0, 1, (rank_v, d)) + rng.normal(0, 2, d)
        t = rng.normal(0, 1, (s, d)) @ rng.normal(0, 0.3, (d, d)) + rng.normal(0, 1, d)
        vs.append(v)
        ts.append(t)
    return vs, ts


CASES = {
    "rows<dim": dict(r=20, s=30, d=64),
    "rows>dim": dict(r=120, s=150, d=24),
    "mixed r<d<s": dict(r=10, s=90, d=40),
    "rank-deficient rows<dim": dict(r=30, s=40, d=48, rank_v=4),
    "rank-deficient rows>dim": dict(r=200, s=150, d=32, rank_v=5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_scipy_reference(name: str) -> None:
    vs, ts = _layers(zlib.crc32(name.encode()) % 1000, 3, **CASES[name])
    ours = compute_mir(vs, ts)
    ref = _ref_mir(vs, ts)
    assert ours.mir == pytest.approx(ref, rel=1e-6)
    ref_layers = [_ref_fd(v, t) for v, t in zip(vs, ts)]
    np.testing.assert_allclose(ours.per_layer, ref_layers, rtol=1e-5)
    assert ours.num_vision_rows == CASES[name]["r"] and ours.num_text_rows == CASES[name]["s"]
    assert ours.cross == "exact" and len(ours.per_layer) == 3


@pytest.mark.parametrize("name", ["rows<dim", "rows>dim"])
def test_outlier_rows_are_replaced(name: str) -> None:
    c = CASES[name]
    vs, ts = _layers(7, 2, **c)
    rng = np.random.default_rng(3)
    for v, t in zip(vs, ts):                                            # huge-norm rows in both modalities
        v[rng.choice(c["r"], 1, replace=False)] *= 300.0
        t[rng.choice(c["s"], 2, replace=False)] *= 100.0
    ours = compute_mir(vs, ts).mir
    assert ours == pytest.approx(_ref_mir(vs, ts), rel=1e-6)
    no_replace = _ref_mir(vs, ts, replace=False)
    assert abs(ours - no_replace) > 0.1                                 # the replacement path mattered
    # the replaced rows are exactly the column-wise lower median of the scaled rows
    v, t = preprocess(vs[0], ts[0])
    a = 1.0 / np.mean(np.linalg.norm(ts[0], axis=1))
    np.testing.assert_allclose(v.numpy(), _ref_outliers(vs[0] * a), rtol=1e-12, atol=1e-14)
    assert v.shape == vs[0].shape and t.shape == ts[0].shape


def test_lower_median_convention_even_rows() -> None:
    rows = np.array([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]] + [[2.5, 2.5]] * 10 + [[900.0, 900.0]])
    out = preprocess(rows[:-1], rows)[1].numpy()                        # 15 rows in text; last is an outlier
    a = 1.0 / np.mean(np.linalg.norm(rows, axis=1))
    np.testing.assert_allclose(out[-1], _ref_lower_median(rows) * a, rtol=1e-12)
    rows16 = np.vstack([rows[:-1], [[3.5, 0.5]], rows[-1:]])             # 16 rows: lower of the 2 middles
    out16 = preprocess(rows16, rows16)[0].numpy()
    a16 = 1.0 / np.mean(np.linalg.norm(rows16, axis=1))
    np.testing.assert_allclose(out16[-1], np.sort(rows16, axis=0)[7] * a16, rtol=1e-12)
    np.testing.assert_allclose(out16[:-1], rows16[:-1] * a16, rtol=1e-12)
    even = preprocess(rows[:4], rows[:4])[0].numpy()                    # 4 rows, no outliers: unchanged
    np.testing.assert_allclose(even, rows[:4] / np.mean(np.linalg.norm(rows[:4], axis=1)), rtol=1e-12)


@pytest.mark.parametrize("name", ["rows<dim", "rows>dim", "rank-deficient rows>dim"])
def test_invariances(name: str) -> None:
    vs, ts = _layers(11, 2, **CASES[name])
    base = compute_mir(vs, ts)
    rng = np.random.default_rng(5)
    scaled = compute_mir([v * f for v, f in zip(vs, (0.01, 37.0))], [t * f for t, f in zip(ts, (0.01, 37.0))])
    np.testing.assert_allclose(scaled.per_layer, base.per_layer, rtol=1e-9)
    shuffled = compute_mir([v[rng.permutation(len(v))] for v in vs], [t[rng.permutation(len(t))] for t in ts])
    np.testing.assert_allclose(shuffled.per_layer, base.per_layer, rtol=1e-9)
    perm = rng.permutation(vs[0].shape[1])
    dims = compute_mir([v[:, perm] for v in vs], [t[:, perm] for t in ts])
    np.testing.assert_allclose(dims.per_layer, base.per_layer, rtol=1e-9)
    assert dims.mir == pytest.approx(base.mir, rel=1e-10)


@pytest.mark.parametrize("r,d", [(20, 64), (300, 32)])
def test_fd_with_itself_is_zero(r: int, d: int) -> None:
    x = torch.from_numpy(_layers(2, 1, r=r, s=r, d=d)[0][0])
    trace_scale = float(torch.cov(x.T).trace())
    assert abs(frechet_distance(x, x)) < 1e-8 * trace_scale
    assert abs(layer_distance(x, x)) < 1e-8 * float(torch.cov(preprocess(x, x)[0].T).trace())


@pytest.mark.parametrize("name", ["rows<dim", "rows>dim"])
def test_paper_fast_is_trace_of_product(name: str) -> None:
    vs, ts = _layers(13, 2, **CASES[name])
    v, t = preprocess(vs[0], ts[0])
    sv, st = np.cov(v.numpy(), rowvar=False), np.cov(t.numpy(), rowvar=False)
    diff = v.numpy().mean(0) - t.numpy().mean(0)
    direct = diff @ diff + np.trace(sv) + np.trace(st) - 2 * np.trace(sv @ st)
    assert frechet_distance(v, t, cross="paper-fast") == pytest.approx(direct, rel=1e-10)
    fast = compute_mir(vs, ts, cross="paper-fast")
    assert fast.cross == "paper-fast"
    assert fast.mir == pytest.approx(_ref_mir(vs, ts, cross="paper-fast"), rel=1e-9)
    assert fast.mir != pytest.approx(compute_mir(vs, ts).mir, rel=1e-6)


def test_exact_path_never_calls_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a, **_k):
        raise AssertionError("scipy was called by the exact MIR path")

    for fn in ("sqrtm", "eigh", "eigvalsh", "svd", "svdvals"):
        if hasattr(scipy.linalg, fn):
            monkeypatch.setattr(scipy.linalg, fn, boom)
    called: list[str] = []

    def profiler(frame, event, arg):  # noqa: ANN001
        if event == "call" and "scipy" in frame.f_code.co_filename:
            called.append(frame.f_code.co_filename)
        elif event == "c_call" and "scipy" in str(getattr(arg, "__module__", "")):
            called.append(str(arg))

    for name in ("rows<dim", "rows>dim"):
        vs, ts = _layers(17, 1, **CASES[name])
        sys.setprofile(profiler)
        try:
            compute_mir(vs, ts)
        finally:
            sys.setprofile(None)
    assert called == []
    import lvlm.mir.distance as distance
    assert "scipy" not in open(distance.__file__).read().split('"""')[2]   # no import below the docstring


def test_torch_and_numpy_inputs_agree_and_stream() -> None:
    vs, ts = _layers(19, 3, r=25, s=40, d=32)
    a = compute_mir(vs, ts)
    b = compute_mir([torch.from_numpy(v).float() for v in vs], [torch.from_numpy(t).float() for t in ts])
    assert b.mir == pytest.approx(a.mir, rel=1e-5)                     # float32 inputs, float64 maths
    acc = LayerwiseMIR()
    fds = [acc.add_layer(v, t) for v, t in zip(vs, ts)]
    res = acc.result()
    assert isinstance(res, MIRResult) and res.per_layer == fds == a.per_layer and res.mir == a.mir
    assert res.total == pytest.approx(10 ** res.mir)


def test_errors_are_clear() -> None:
    v, t = np.ones((5, 8)), np.random.default_rng(0).normal(size=(6, 8))
    with pytest.raises(ValueError, match="'exact', 'paper-fast'"):
        compute_mir([v], [t], cross="accurate")
    with pytest.raises(ValueError, match="'exact', 'paper-fast'"):
        frechet_distance(v, t, cross="fast")
    with pytest.raises(ValueError, match="layer count mismatch: 2 vision layers vs 1"):
        compute_mir([v, v], [t])
    with pytest.raises(ValueError, match="no layers"):
        compute_mir([], [])
    with pytest.raises(ValueError, match="empty"):
        compute_mir([np.zeros((0, 8))], [t])
    with pytest.raises(ValueError, match="at least 2 rows"):
        compute_mir([v], [t[:1]])
    with pytest.raises(ValueError, match="hidden dim mismatch"):
        compute_mir([v], [t[:, :4]])
    with pytest.raises(ValueError, match="2-D"):
        compute_mir([v[0]], [t])
    with pytest.raises(ValueError, match="NaN"):
        compute_mir([v * np.nan], [t])
    with pytest.raises(ValueError, match="no layers added"):
        LayerwiseMIR().result()
    acc = LayerwiseMIR()
    acc.add_layer(v, t)
    with pytest.raises(ValueError, match="layer 1: .* same tokens"):
        acc.add_layer(v[:4], t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    for name in ("rows<dim", "rows>dim", "rank-deficient rows>dim"):
        vs, ts = _layers(23, 2, **CASES[name])
        cpu = compute_mir(vs, ts)
        gpu = compute_mir([torch.from_numpy(v).cuda() for v in vs], [torch.from_numpy(t).cuda() for t in ts])
        assert gpu.mir == pytest.approx(cpu.mir, rel=1e-9)
        assert gpu.mir == pytest.approx(_ref_mir(vs, ts), rel=1e-6)
        v, t = preprocess(torch.from_numpy(vs[0]).cuda(), torch.from_numpy(ts[0]).cuda())
        assert v.device.type == "cuda" and t.dtype == torch.float64


def test_blockwise_gram_and_both_root_factors() -> None:
    """The triangular block Gram equals X^T X; the Cholesky and eigh factors give the same cross term."""
    from lvlm.mir import distance

    x = torch.from_numpy(np.random.default_rng(3).normal(size=(40, 301)))   # d not divisible by the blocks
    assert torch.allclose(ops.gram(x), x.T @ x, rtol=1e-12, atol=1e-12)
    vs, ts = _layers(23, 1, r=120, s=90, d=40)
    v, t = preprocess(vs[0], ts[0])
    xc = (v - v.mean(0)) / (v.shape[0] - 1) ** 0.5
    yc = (t - t.mean(0)) / (t.shape[0] - 1) ** 0.5
    sv, st = xc.T @ xc, yc.T @ yc
    chol, eig = distance._root_factor(sv), distance._psd_root_factor(sv)
    assert chol.shape == (40, 40) and bool((torch.triu(chol, 1) == 0).all())   # the Cholesky branch ran
    via = [torch.linalg.eigvalsh(f.T @ st @ f).clamp_min(0).sqrt().sum() for f in (chol, eig)]
    ref = float(np.real(np.trace(scipy.linalg.sqrtm(sv.numpy() @ st.numpy()))))
    assert float(via[0]) == pytest.approx(ref, rel=1e-9) and float(via[1]) == pytest.approx(ref, rel=1e-9)
    singular = sv.clone()
    singular[:, 0] = singular[0, :] = 0.0                                   # a zero-variance dimension
    f = distance._root_factor(singular)
    assert f.shape[1] < 40 and torch.allclose(f @ f.T, singular, atol=1e-10)  # fell back to eigh


def _torch_route_fd(v: np.ndarray, t: np.ndarray) -> float:
    """layer_distance through the torch ops (the CUDA route), run on CPU tensors; CPU inputs normally
    take the numpy ops."""
    from lvlm.mir import distance

    vt, tt = torch.from_numpy(v.copy()), torch.from_numpy(t.copy())
    nv, nt = torch.linalg.vector_norm(vt, dim=1), torch.linalg.vector_norm(tt, dim=1)
    return distance._frechet(distance._replaced_centred(vt, nv, True), distance._replaced_centred(tt, nt, True),
                             "exact", scale=1.0 / float(nt.mean()))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("rank_v", [None, 40, 12, 3])
def test_gram_shortcut_is_within_its_tolerance_of_the_svd(monkeypatch: pytest.MonkeyPatch, rank_v, backend) -> None:
    """rows < d: the M M^T eigenvalue shortcut is used only when its error bound allows; either way the
    FD equals the SVD-only FD to GRAM_ROUTE_REL_TOL (full rank: shortcut taken; rank 3: SVD taken)."""
    from lvlm.mir import distance

    svd_shapes: list[tuple[int, ...]] = []
    backend_ops = ops.NumpyOps if backend == "numpy" else ops.TorchOps
    real = backend_ops.svdvals
    fd_of = layer_distance if backend == "numpy" else _torch_route_fd

    def counting(m):  # noqa: ANN001
        svd_shapes.append(tuple(m.shape))
        return real(m)

    monkeypatch.setattr(backend_ops, "svdvals", staticmethod(counting))
    vs, ts = _layers(29, 1, r=60, s=90, d=128, rank_v=rank_v)
    fd = fd_of(vs[0], ts[0])
    took_svd = bool(svd_shapes)
    monkeypatch.setattr(distance, "GRAM_ROUTE_REL_TOL", 0.0)            # forces the SVD
    svd_shapes.clear()
    fd_svd = fd_of(vs[0], ts[0])
    assert svd_shapes == [(60, 90)]
    assert abs(fd - fd_svd) <= 1e-7 * abs(fd_svd)
    if rank_v is None:
        assert not took_svd and fd == pytest.approx(fd_svd, rel=1e-12)  # shortcut taken, and exact here
    if rank_v == 3:
        assert took_svd                                                 # 56 null directions: bound too big


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("cross", ["exact", "paper-fast"])
def test_numpy_and_torch_backends_agree(name: str, cross: str) -> None:
    """The cross term through numpy (CPU) and through torch (CUDA's route, run on CPU) agree."""
    from lvlm.mir import distance

    vs, ts = _layers(37, 1, **CASES[name])
    v, t = preprocess(vs[0], ts[0])
    xc, yc = v - v.mean(0), t - t.mean(0)
    rest = float((v.mean(0) - t.mean(0)).square().sum() + xc.square().sum() / (len(v) - 1)
                 + yc.square().sum() / (len(t) - 1))
    via_torch = distance.cross_term(xc, yc, cross, fd_rest=rest)
    via_numpy = distance.cross_term(xc.numpy(), yc.numpy(), cross, fd_rest=rest)
    assert via_numpy == pytest.approx(via_torch, rel=1e-10)
    if cross == "exact":
        sv, st = np.cov(v.numpy(), rowvar=False), np.cov(t.numpy(), rowvar=False)
        ref = float(np.real(np.trace(scipy.linalg.sqrtm(sv @ st))))
        assert via_numpy == pytest.approx(ref, rel=1e-7)


@pytest.mark.parametrize("name", list(CASES))
def test_whole_layer_numpy_and_torch_routes_agree(name: str) -> None:
    """CPU layers run in numpy end to end (norms, outlier rule, column medians, centring, cross term);
    CUDA layers in torch. The two give the same FD, outlier rows included."""
    vs, ts = _layers(43, 1, **CASES[name])
    v, t = vs[0].copy(), ts[0].copy()
    v[1] *= 400.0                                                       # outliers in both modalities
    t[[2, 7]] *= 300.0
    assert layer_distance(v, t) == pytest.approx(_torch_route_fd(v, t), rel=1e-10)
    assert layer_distance(v, t) == pytest.approx(_ref_fd(v, t), rel=1e-6)


@pytest.mark.parametrize("n,d", [(7, 5), (8, 130), (301, 64), (64, 1)])
def test_numpy_column_lower_median_matches_torch(n: int, d: int) -> None:
    """The block-wise (threaded) numpy selection = torch.median's lower median, ties and even n included."""
    x = np.round(np.random.default_rng(n + d).normal(size=(n, d)), 1)   # rounding makes ties
    got = ops.NumpyOps.column_lower_median(x)
    np.testing.assert_array_equal(got, torch.median(torch.from_numpy(x), dim=0).values.numpy())
    np.testing.assert_array_equal(got, _ref_lower_median(x))
    assert ops.NumpyOps.lower_median(x[:, 0]) == _ref_lower_median(x[:, :1])[0]


def test_inputs_are_never_modified() -> None:
    """Outlier replacement and centring work in place on an owned copy, never on the caller's rows."""
    c = CASES["rows>dim"]
    vs, ts = _layers(41, 2, **c)
    vs[0][3] *= 500.0                                                   # an outlier row in each modality
    ts[0][5] *= 500.0
    keep_v, keep_t = [v.copy() for v in vs], [t.copy() for t in ts]
    tv, tt = [torch.from_numpy(v.copy()) for v in vs], [torch.from_numpy(t.copy()) for t in ts]
    a = compute_mir(vs, ts)
    b = compute_mir(tv, tt)
    assert a.per_layer == b.per_layer
    for got, want in zip(vs + ts, keep_v + keep_t):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(tv + tt, keep_v + keep_t):
        np.testing.assert_array_equal(got.numpy(), want)
    f32 = compute_mir([torch.from_numpy(v).float() for v in vs], [torch.from_numpy(t).float() for t in ts])
    assert f32.mir == pytest.approx(a.mir, rel=1e-5)


# ----------------------------------------------------------------------------- probe collection
class _FakeLVLM:
    """hidden_states[k] = table_k[input_ids] + k * pixel mean: deterministic, different per layer."""

    def __init__(self, layers: int, vocab: int, dim: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.tables = [torch.randn(vocab, dim, generator=g) * (1 + k) for k in range(layers + 1)]
        self.calls = 0

    def __call__(self, input_ids, attention_mask, pixel_values, output_hidden_states):  # noqa: ANN001
        from types import SimpleNamespace

        self.calls += 1
        return SimpleNamespace(hidden_states=tuple(t[input_ids] + k * pixel_values.mean()
                                                   for k, t in enumerate(self.tables)))


def _fake_probe(num_batches: int):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(num_batches):
        ids = torch.randint(3, 50, (2, 12), generator=g)
        ids[:, 1:5] = 2                                                  # 4 image tokens per sample
        vision = ids == 2
        text = torch.zeros_like(vision)
        text[:, 5:] = True
        batches.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), vision_mask=vision, text_mask=text,
                            pixel_values=torch.rand(2, 3, 4, 4, generator=g)))
    return SimpleNamespace(batches=batches)


def test_probe_streams_layer_groups_and_splits_ranks() -> None:
    from lvlm.mir.collect import plan_group, probe_mir

    probe, layers = _fake_probe(3), 5
    cpu = torch.device("cpu")
    model = _FakeLVLM(layers, 50, 16)
    whole = probe_mir(model, probe, layers, cpu)                        # auto: every layer fits in 8 GiB
    assert model.calls == 3 and len(whole.per_layer) == layers
    model.calls = 0
    one = probe_mir(model, probe, layers, cpu, layers_per_pass=2)      # passes of 2, 2, 1 layers
    assert model.calls == 3 * 3 and one.per_layer == whole.per_layer
    model.calls = 0
    tiny_budget = probe_mir(model, probe, layers, cpu, memory_gb=1e-9)  # budget below one layer -> 1 per pass
    assert model.calls == 3 * layers and tiny_budget.per_layer == whole.per_layer
    assert plan_group(32, 2**30, 0, 8.0) == 8 and plan_group(32, 2**30, 3, 8.0) == 3
    with pytest.raises(ValueError, match="layers_per_pass"):
        plan_group(4, 10, -1, 1.0)

    # two ranks: rank 1 runs batch 1 (+ one repeated forward), rank 0 batches 0 and 2; rank 0 merges
    sent: list[torch.Tensor] = []
    rank1 = probe_mir(model, probe, layers, cpu, layers_per_pass=2, rank=1, world_size=2,
                      gather=lambda rows: sent.append(rows))
    assert rank1 is None and len(sent) == 2 * layers
    received = iter(sent)
    rank0 = probe_mir(model, probe, layers, cpu, layers_per_pass=2, rank=0, world_size=2,
                      gather=lambda rows: [rows, next(received)])
    assert rank0.per_layer == pytest.approx(whole.per_layer, rel=1e-12)
    assert rank0.num_vision_rows == whole.num_vision_rows == 3 * 2 * 4
    with pytest.raises(ValueError, match="gather"):
        probe_mir(model, probe, layers, cpu, rank=0, world_size=2)

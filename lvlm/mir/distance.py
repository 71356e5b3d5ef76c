"""Per-layer MIR maths: text-centric normalisation, outlier replacement and the Frechet distance.

Owns the numerical core of the Modality Integration Rate (PAPERS.md section 1, "The computation"):
steps 2-5 for ONE layer. Everything runs in float64: on a CUDA device with torch, on CPU with numpy
end to end (the two backends: lvlm.mir.ops, which also says why). torch tensors and numpy arrays are
accepted. No scipy, no general (non-symmetric) matrix square root.

Assumes rows are already pooled over the probe set: vision [r, d] are the image-token hidden
states, text [s, d] the positions after the image span, both from the same hidden_states index.

One pass per modality: row norms (finite check, normaliser, outlier rule), outlier replacement and
centring in one owned copy; the text-centric scale a enters only the scalar terms (FD scales by a^2),
and 1/(n-1) only the small products, so no scaled [n, d] copies are made.

Cross term Tr((Sv St)^{1/2}) with Xc = (V - mu_v)/sqrt(r-1), Yc = (T - mu_t)/sqrt(s-1):
  - min(r, s) < d: sum of singular values of M = Xc Yc^T [r, s] (nuclear norm), from the
                   eigenvalues of the min(r,s)-square Gram M M^T while a rounding-error bound keeps
                   the FD within GRAM_ROUTE_REL_TOL, else from the SVD of M (see _nuclear_norm);
  - otherwise:     sum sqrt(max(lambda, 0)) of L^T St L  [d, d], Sv = L L^T (Cholesky), which is
                   similar to Sv St; when Sv is numerically singular (Cholesky fails) the factor
                   comes from one eigendecomposition of Sv instead, its null space dropped.
Covariances are syrk-style Gram matrices (upper triangle only: numpy's x.T @ x, or the block-wise
`ops.gram` on CUDA).
"paper-fast" reproduces the reference code's default mode, which actually uses Tr(Sv St).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

from lvlm.mir.ops import TorchOps, array_ops

ArrayLike = Union[torch.Tensor, np.ndarray]
CROSS_MODES: tuple[str, ...] = ("exact", "paper-fast")
OUTLIER_SIGMAS = 3.0


def check_cross(cross: str) -> str:
    """Validate the cross-term mode; returns it unchanged."""
    if cross not in CROSS_MODES:
        raise ValueError(f"cross={cross!r} is not a valid cross-term mode; choose one of "
                         f"{', '.join(repr(c) for c in CROSS_MODES)}")
    return cross


def as_float64(x: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    """A float64 [rows, dim] tensor (on `device` when given); ValueError on bad shape or values."""
    t, _ = _float64_tensor(x, name, device)
    _row_norms_checked(t, name)
    return t


def _float64_tensor(x: ArrayLike, name: str, device: torch.device | None) -> tuple[torch.Tensor, bool]:
    """(float64 tensor on `device` or x's own, whether it is a fresh copy); shape and dtype checked."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray [rows, dim], "
                         f"got {type(x).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}; need at least 2 rows and 1 column")
    if t.shape[0] < 2:
        raise ValueError(f"{name} has {t.shape[0]} row; need at least 2 rows for a covariance (1/(n-1))")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.int8)):
        raise ValueError(f"{name} has unsupported dtype {t.dtype}; pass real floating-point hidden states")
    converted = t.to(device=device if device is not None else t.device, dtype=torch.float64)
    return converted, converted.data_ptr() != t.data_ptr()


def _row_norms_checked(x, name: str):
    """[rows] row norms of x (tensor or array); ValueError when a row holds NaN or Inf.

    A row norm is finite iff the row is (barring overflow past 1e154): [rows] instead of [rows, dim].
    """
    ops = array_ops(x)
    norms = ops.row_norms(x)
    if not ops.all_finite(norms):
        raise ValueError(f"{name} contains NaN or Inf values")
    return norms


def _checked(x: ArrayLike, name: str, device: torch.device | None = None) -> tuple:
    """(rows, row norms [rows], fresh): float64 rows as a numpy array when they end up on CPU, else a
    torch tensor on `device` (or x's own); fresh: True when rows is a copy the caller may modify in place,
    False when it may share memory with the caller's input."""
    t, fresh = _float64_tensor(x, name, device)
    rows = t
    if t.device.type == "cpu":
        view = t.numpy()                                                # shares t's memory
        rows = np.ascontiguousarray(view)
        fresh = fresh or rows is not view
    return rows, _row_norms_checked(rows, name), fresh


def _device(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _check_pair(vision, text) -> None:
    if vision.shape[1] != text.shape[1]:
        raise ValueError(f"hidden dim mismatch: vision rows have dim {vision.shape[1]}, "
                         f"text rows have dim {text.shape[1]}; both must come from the same layer")


def _outlier_rows(norms):
    """[n] bool: rows whose norm is > 3 sd (strictly) from the lower-median norm; None when there are none.

    norms: [n] tensor or array. Scale-free: scaling every row by a > 0 scales the norms, their median and
    their sd alike, so the rows found are the same before and after the text-centric scaling.
    """
    ops = array_ops(norms)
    centre = ops.lower_median(norms)                                    # [] element (n-1)//2 of the sorted
    outlier = abs(norms - centre) > OUTLIER_SIGMAS * ops.std1(norms)    # [n] bool; sd with 1/(n-1)
    return outlier if bool(outlier.any()) else None


def replace_outliers(rows: torch.Tensor) -> torch.Tensor:
    """Rows whose norm is > 3 sd from the lower-median norm become the column-wise lower median.

    rows: [n, d] float64 -> [n, d] (a new tensor; row count unchanged).
    """
    outlier = _outlier_rows(torch.linalg.vector_norm(rows, dim=1))
    if outlier is None:
        return rows
    col_median = TorchOps.column_lower_median(rows)                     # [d], before replacement
    return torch.where(outlier[:, None], col_median[None, :], rows)     # [n, d]


def preprocess(vision: ArrayLike, text: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3: scale both by 1/mean text-row norm, then replace outliers per modality.

    vision [r, d], text [s, d] -> float64 (V [r, d], T [s, d]) on vision's device.
    """
    v = as_float64(vision, "vision")
    t = as_float64(text, "text", device=v.device)
    _check_pair(v, t)
    a = 1.0 / _mean_norm(torch.linalg.vector_norm(t, dim=1))
    return replace_outliers(v * a), replace_outliers(t * a)


def _mean_norm(text_norms) -> float:
    mean_norm = float(text_norms.mean())
    if not mean_norm > 0.0:
        raise ValueError("text rows are all zero: the mean text-row norm (the normaliser) is 0")
    return mean_norm


def _replaced_centred(rows, norms, fresh: bool, replace: bool = True) -> tuple:
    """rows [n, d] -> (mean [d], rows - mean [n, d]) after outlier replacement, in one owned copy.

    rows and norms: torch tensors or numpy arrays (the result has the same kind). The centred rows are
    NOT divided by sqrt(n-1): callers scale the small products instead.
    """
    ops = array_ops(rows)
    outlier = _outlier_rows(norms) if replace else None
    out = rows if fresh else rows.copy() if isinstance(rows, np.ndarray) else rows.clone()
    if outlier is not None:
        out[outlier] = ops.column_lower_median(rows)                    # [d] column medians, pre-replacement
    mu = out.mean(0)
    out -= mu
    return mu, out


def _sym(a):
    return 0.5 * (a + a.T)


EPS = float(np.finfo(np.float64).eps)
# The Gram shortcut for the nuclear norm is kept only while its error bound is below this fraction of
# the layer's FD (otherwise the SVD of the cross matrix is used): 10x inside the 1e-6 on MIR.
GRAM_ROUTE_REL_TOL = 1e-7


def _root_factor(s):
    """F [d, k] with F F^T = S for symmetric PSD S [d, d]: Cholesky, or eigh when S is singular."""
    low = array_ops(s).cholesky(s)
    return low if low is not None else _psd_root_factor(s)


def _psd_root_factor(s):
    """F [d, k] with F F^T = S (S symmetric PSD [d, d]), F = U_k diag(sqrt w_k) via eigh.

    Eigenvalues below d * eps * max(w) are numerically zero (rank-deficient S) and dropped, so
    they cannot leak sqrt(eps)-sized noise into the cross term.
    """
    ops = array_ops(s)
    w, u = ops.eigh(_sym(s))                                            # [d], [d, d] ascending
    tol = abs(w).max() * s.shape[0] * EPS
    keep = w > tol                                                      # [d] bool
    return u[:, keep] * ops.sqrt(w[keep])                               # [d, k]


def _nuclear_norm(m, fd_rest: float) -> float:
    """Sum of the singular values of the cross matrix m [r, s] (both sides centred).

    Fast route: with a = min(r, s), b = max(r, s), the eigenvalues of the a x a Gram matrix
    G = m m^T (or m^T m) are the squared singular values; one symmetric eigensolve replaces the SVD
    (~4x cheaper). Centring makes m rank <= a - 1, so the smallest eigenvalue is an exact zero and is
    dropped. Squaring costs accuracy only in the small singular values: with an eigenvalue error of at
    most delta = eps * (a * lam_max + sqrt(b) * Tr G) (eigensolver backward error plus the rounding
    of G), each sqrt(lam_i) is off by at most min(sqrt(delta), delta / (2 sqrt(lam_i))). When twice
    the summed bound exceeds GRAM_ROUTE_REL_TOL of this layer's FD (fd_rest - 2 * cross), e.g. for
    rank-deficient or nearly identical inputs, the SVD of m gives the answer instead.
    """
    ops = array_ops(m)
    a, b = min(m.shape), max(m.shape)
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m               # [a, a]
    lam = ops.eigvalsh(g)                                               # ascending
    lam_max = max(float(lam[-1]), 0.0)
    if lam_max == 0.0:
        return 0.0
    delta = EPS * (a * lam_max + b ** 0.5 * float(g.trace()))
    sig = ops.sqrt(ops.clamp0(lam[1:]))                                 # [a - 1]
    nuclear = float(sig.sum())
    sig_host = sig.cpu().numpy() if isinstance(sig, torch.Tensor) else sig
    err = float(np.minimum(delta ** 0.5, delta / (2.0 * np.maximum(sig_host, 1e-300))).sum())
    if 2.0 * err <= GRAM_ROUTE_REL_TOL * abs(fd_rest - 2.0 * nuclear):
        return nuclear
    return float(ops.svdvals(m).sum())


def cross_term(xc, yc, cross: str = "exact", fd_rest: float | None = None) -> float:
    """Tr((Sv St)^{1/2}) ("exact") or Tr(Sv St) ("paper-fast") from centred rows.

    xc [r, d], yc [s, d]: rows minus their mean (torch tensors, or numpy arrays for the CPU route);
    Sv = xc^T xc / (r-1), St = yc^T yc / (s-1), the 1/(n-1) applied to the small products. Returns a
    float. fd_rest = ||mu_v - mu_t||^2 + Tr Sv + Tr St, the rest of the FD, sets the accuracy the
    rows < d Gram shortcut must reach (None: always take the SVD there).
    """
    check_cross(cross)
    ops = array_ops(xc)
    r, d = xc.shape
    s = yc.shape[0]
    if min(r, s) < d:
        m = xc @ yc.T                                                   # [r, s]
        m *= 1.0 / ((r - 1) * (s - 1)) ** 0.5                           # = Xc Yc^T of the scaled rows
        if cross == "paper-fast":
            return float((m * m).sum())                                 # ||Xc Yc^T||_F^2
        if fd_rest is None:
            return float(ops.svdvals(m).sum())
        return _nuclear_norm(m, fd_rest)
    sv = ops.gram(xc)                                                   # [d, d]
    sv *= 1.0 / (r - 1)
    st = ops.gram(yc)                                                   # [d, d]
    st *= 1.0 / (s - 1)
    if cross == "paper-fast":
        return float((sv * st).sum())                                   # Tr(Sv St), both symmetric
    # Tr((Sv St)^{1/2}) = sum sqrt(eig(Sv St)). For any F with F F^T = Sv, F^T St F has the same
    # nonzero eigenvalues as Sv St (eig(AB) = eig(BA) with A = F, B = F^T St), and it is symmetric.
    f = _root_factor(sv)                                                # [d, k]
    if f.shape[1] == 0:
        return 0.0
    lam = ops.eigvalsh(_sym(f.T @ st @ f))                              # [k]
    return float(ops.sqrt(ops.clamp0(lam)).sum())


def frechet_distance(vision: ArrayLike, text: ArrayLike, cross: str = "exact") -> float:
    """FD = ||mu_v - mu_t||^2 + Tr Sv + Tr St - 2 * cross, on the rows as given (no preprocessing).

    vision [r, d], text [s, d]; covariances use 1/(n-1). Returns a Python float.
    """
    check_cross(cross)
    v, nv, fresh_v = _checked(vision, "vision")
    t, nt, fresh_t = _checked(text, "text", device=_device(v))
    _check_pair(v, t)
    return _frechet(_replaced_centred(v, nv, fresh_v, replace=False),
                    _replaced_centred(t, nt, fresh_t, replace=False), cross)


def _frechet(vision: tuple, text: tuple, cross: str, scale: float = 1.0) -> float:
    """FD from (mean [d], centred rows [n, d]) per modality, float64: torch tensors on one device, or
    numpy arrays (CPU).

    scale a: the FD of the rows multiplied by a, without forming them. Means, traces and the exact
    cross term scale by a^2; paper-fast's Tr(Sv St) by a^4 (it is not a distance, hence not homogeneous).
    """
    (mu_v, xc), (mu_t, yc) = vision, text
    ops = array_ops(xc)
    diff = mu_v - mu_t
    rest = float(diff @ diff) + ops.sq_norm(xc) / (xc.shape[0] - 1) + ops.sq_norm(yc) / (yc.shape[0] - 1)
    c = cross_term(xc, yc, cross, fd_rest=rest)                         # rest: ||mu diff||^2 + Tr Sv + Tr St
    a2 = scale * scale
    return a2 * rest - 2.0 * c * (a2 if cross == "exact" else a2 * a2)


def layer_distance(vision: ArrayLike, text: ArrayLike, cross: str = "exact") -> float:
    """One layer's FD_k after normalisation and outlier replacement (steps 2-5).

    Computed on the unscaled rows, the scale a = 1 / mean text-row norm applied to the scalar terms
    (see _frechet); scaling both modalities by a > 0 leaves the outlier rows unchanged.
    """
    check_cross(cross)
    v, nv, fresh_v = _checked(vision, "vision")
    t, nt, fresh_t = _checked(text, "text", device=_device(v))
    _check_pair(v, t)
    a = 1.0 / _mean_norm(nt)
    return _frechet(_replaced_centred(v, nv, fresh_v), _replaced_centred(t, nt, fresh_t), cross, scale=a)

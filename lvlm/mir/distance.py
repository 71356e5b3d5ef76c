"""Per-layer MIR maths: text-centric normalisation, outlier replacement and the Frechet distance.

Owns the numerical core of the Modality Integration Rate (PAPERS.md section 1, "The computation"):
steps 2-5 for ONE layer. Everything runs in float64 with torch.linalg on whatever device the
input lives on (CPU or CUDA); numpy arrays are accepted and converted. No scipy, no general
(non-symmetric) matrix square root.

Assumes rows are already pooled over the probe set: vision [r, d] are the image-token hidden
states, text [s, d] the positions after the image span, both from the same hidden_states index.

Cross term Tr((Sv St)^{1/2}) with Xc = (V - mu_v)/sqrt(r-1), Yc = (T - mu_t)/sqrt(s-1):
  - min(r, s) < d: sum of singular values of Xc Yc^T  [r, s]   (nuclear norm)
  - otherwise:     sum sqrt(max(lambda, 0)) of L^T St L  [d, d], Sv = L L^T (Cholesky), which is
                   similar to Sv St; when Sv is numerically singular (Cholesky fails) the factor
                   comes from one eigendecomposition of Sv instead, its null space dropped.
Both covariances (Gram matrices) are built block-wise over the upper triangle only (~40% fewer
flops than a full X^T X).
"paper-fast" reproduces the reference code's default mode, which actually uses Tr(Sv St).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

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
    t = t.to(device=device if device is not None else t.device, dtype=torch.float64)
    # a row norm is finite iff the row is (barring overflow past 1e154): [rows] instead of [rows, dim]
    if not bool(torch.isfinite(torch.linalg.vector_norm(t, dim=1)).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return t


def _check_pair(vision: torch.Tensor, text: torch.Tensor) -> None:
    if vision.shape[1] != text.shape[1]:
        raise ValueError(f"hidden dim mismatch: vision rows have dim {vision.shape[1]}, "
                         f"text rows have dim {text.shape[1]}; both must come from the same layer")


def _lower_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Element (n-1)//2 of the sorted values along `dim` (torch.median's convention)."""
    return torch.median(x, dim=dim).values  # documented: the lower of the two middle values


def replace_outliers(rows: torch.Tensor) -> torch.Tensor:
    """Rows whose norm is > 3 sd from the lower-median norm become the column-wise lower median.

    rows: [n, d] float64 -> [n, d] (a new tensor; row count unchanged).
    """
    norms = torch.linalg.vector_norm(rows, dim=1)                       # [n]
    centre = _lower_median(norms, 0)                                    # []
    sd = torch.std(norms, correction=1)                                 # []
    outlier = (norms - centre).abs() > OUTLIER_SIGMAS * sd              # [n] bool, strict
    if not bool(outlier.any()):
        return rows
    col_median = _lower_median(rows, 0)                                 # [d], before replacement
    return torch.where(outlier[:, None], col_median[None, :], rows)     # [n, d]


def preprocess(vision: ArrayLike, text: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3: scale both by 1/mean text-row norm, then replace outliers per modality.

    vision [r, d], text [s, d] -> float64 (V [r, d], T [s, d]) on vision's device.
    """
    v = as_float64(vision, "vision")
    t = as_float64(text, "text", device=v.device)
    _check_pair(v, t)
    mean_norm = torch.linalg.vector_norm(t, dim=1).mean()               # []
    if not float(mean_norm) > 0.0:
        raise ValueError("text rows are all zero: the mean text-row norm (the normaliser) is 0")
    a = 1.0 / mean_norm
    return replace_outliers(v * a), replace_outliers(t * a)


def _centred(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [n, d] -> (mean [d], (rows - mean)/sqrt(n-1) [n, d])."""
    mu = rows.mean(dim=0)
    return mu, (rows - mu) / (rows.shape[0] - 1) ** 0.5


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.T)


GRAM_BLOCKS = 4


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x for x [n, d] -> [d, d], computing only the upper block triangle and mirroring it."""
    d = x.shape[1]
    if d < 256:
        return x.T @ x
    step = -(-d // GRAM_BLOCKS)
    g = x.new_empty(d, d)
    for i in range(0, d, step):
        block = x[:, i:i + step].T @ x[:, i:]                           # [step, d - i]
        g[i:i + step, i:] = block
        g[i + step:, i:i + step] = block[:, step:].T
    return g


def _root_factor(s: torch.Tensor) -> torch.Tensor:
    """F [d, k] with F F^T = S for symmetric PSD S [d, d]: Cholesky, or eigh when S is singular."""
    low, info = torch.linalg.cholesky_ex(s)
    if int(info) == 0 and bool(torch.diagonal(low).gt(0).all()):
        return low
    return _psd_root_factor(s)


def _psd_root_factor(s: torch.Tensor) -> torch.Tensor:
    """F [d, k] with F F^T = S (S symmetric PSD [d, d]), F = U_k diag(sqrt w_k) via eigh.

    Eigenvalues below d * eps * max(w) are numerically zero (rank-deficient S) and dropped, so
    they cannot leak sqrt(eps)-sized noise into the cross term.
    """
    w, u = torch.linalg.eigh(_sym(s))                                   # [d], [d, d] ascending
    tol = w.abs().max() * s.shape[0] * torch.finfo(torch.float64).eps
    keep = w > tol                                                      # [d] bool
    return u[:, keep] * w[keep].sqrt()                                  # [d, k]


def cross_term(xc: torch.Tensor, yc: torch.Tensor, cross: str = "exact") -> torch.Tensor:
    """Tr((Sv St)^{1/2}) ("exact") or Tr(Sv St) ("paper-fast") from centred, scaled rows.

    xc [r, d], yc [s, d] with Sv = xc^T xc, St = yc^T yc -> 0-dim float64 tensor.
    """
    check_cross(cross)
    r, d = xc.shape
    s = yc.shape[0]
    if min(r, s) < d:
        m = xc @ yc.T                                                   # [r, s]
        if cross == "paper-fast":
            return (m * m).sum()                                        # ||Xc Yc^T||_F^2
        return torch.linalg.svdvals(m).sum()                            # nuclear norm
    sv = gram(xc)                                                       # [d, d]
    st = gram(yc)                                                       # [d, d]
    if cross == "paper-fast":
        return (sv * st).sum()                                          # Tr(Sv St), both symmetric
    # Tr((Sv St)^{1/2}) = sum sqrt(eig(Sv St)). For any F with F F^T = Sv, F^T St F has the same
    # nonzero eigenvalues as Sv St (eig(AB) = eig(BA) with A = F, B = F^T St), and it is symmetric.
    f = _root_factor(sv)                                                # [d, k]
    if f.shape[1] == 0:
        return sv.new_zeros(())
    lam = torch.linalg.eigvalsh(_sym(f.T @ st @ f))                     # [k]
    return lam.clamp_min(0.0).sqrt().sum()


def frechet_distance(vision: ArrayLike, text: ArrayLike, cross: str = "exact") -> float:
    """FD = ||mu_v - mu_t||^2 + Tr Sv + Tr St - 2 * cross, on the rows as given (no preprocessing).

    vision [r, d], text [s, d]; covariances use 1/(n-1). Returns a Python float.
    """
    check_cross(cross)
    v = as_float64(vision, "vision")
    t = as_float64(text, "text", device=v.device)
    _check_pair(v, t)
    mu_v, xc = _centred(v)
    mu_t, yc = _centred(t)
    diff = mu_v - mu_t
    fd = diff @ diff + (xc * xc).sum() + (yc * yc).sum() - 2.0 * cross_term(xc, yc, cross)
    return float(fd)


def layer_distance(vision: ArrayLike, text: ArrayLike, cross: str = "exact") -> float:
    """One layer's FD_k after normalisation and outlier replacement (steps 2-5)."""
    check_cross(cross)
    v, t = preprocess(vision, text)
    return frechet_distance(v, t, cross)

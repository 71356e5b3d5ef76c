"""The array calls one MIR layer needs, in two backends with the same names: torch (any device; used
for CUDA) and numpy (CPU).

Owns only dispatch and the few kernels with no single library call (block-wise Gram, threaded
column-wise lower median). lvlm.mir.distance holds the maths and picks the backend with ``array_ops``.

Why numpy on CPU: OpenBLAS's symmetric eigensolver and syrk-based ``x.T @ x`` measured ~1.5x and ~2x
faster than torch's CPU ones on the 2-core AMD host, and a layer kept in one library end to end avoids
torch's OpenMP pool and OpenBLAS's threads spinning against each other (mixing them measured 1.1-1.9x
slower per layer).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

GRAM_BLOCKS = 4
MEDIAN_BLOCK = 64                                                       # columns per selection block (CPU)


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


class TorchOps:
    """The few array calls one layer needs, on torch (any device; used for CUDA)."""

    @staticmethod
    def row_norms(x):                                                   # [n, d] -> [n]
        return torch.linalg.vector_norm(x, dim=1)

    @staticmethod
    def all_finite(x) -> bool:
        return bool(torch.isfinite(x).all())

    @staticmethod
    def lower_median(x):                                                # [n] -> [] (documented: the lower
        return torch.median(x)                                          # of the two middle values)

    @staticmethod
    def column_lower_median(x):                                         # [n, d] -> [d]
        return torch.median(x, dim=0).values

    @staticmethod
    def std1(x):                                                        # [n] -> [], 1/(n-1)
        return torch.std(x, correction=1)

    @staticmethod
    def sq_norm(x) -> float:                                            # sum of squares, no [n, d] temporary
        return float(torch.linalg.vector_norm(x) ** 2)

    gram = staticmethod(gram)                                           # x [n, d] -> x^T x [d, d], block-wise

    @staticmethod
    def cholesky(s):                                                    # lower factor, or None if not PD
        low, info = torch.linalg.cholesky_ex(s)
        return low if int(info) == 0 and bool(torch.diagonal(low).gt(0).all()) else None

    eigh = staticmethod(torch.linalg.eigh)
    eigvalsh = staticmethod(torch.linalg.eigvalsh)
    svdvals = staticmethod(torch.linalg.svdvals)
    sqrt = staticmethod(torch.sqrt)

    @staticmethod
    def clamp0(x):
        return x.clamp_min(0.0)


class NumpyOps:
    """The same calls on CPU through numpy's LAPACK/BLAS (OpenBLAS): its symmetric eigensolver and
    its syrk-based x.T @ x measured ~1.5x and ~2x faster than torch's CPU ones on the 2-core host."""

    @staticmethod
    def row_norms(x):
        return np.sqrt(np.einsum("ij,ij->i", x, x))

    @staticmethod
    def all_finite(x) -> bool:
        return bool(np.isfinite(x).all())

    @staticmethod
    def lower_median(x):
        k = (x.shape[0] - 1) // 2
        return np.partition(x, k)[k]

    @staticmethod
    def column_lower_median(x):
        """Element (n-1)//2 of each sorted column of x [n, d] -> [d], by selection (no full sort) on
        column blocks copied to rows, so each selection runs on contiguous memory. numpy's partition
        releases the GIL, so the blocks run on torch.get_num_threads() threads (~1.8x on 2 cores)."""
        n, d = x.shape
        k = (n - 1) // 2
        out = np.empty(d, dtype=x.dtype)

        def select(j: int) -> None:
            block = np.ascontiguousarray(x[:, j:j + MEDIAN_BLOCK].T)     # [b, n]
            block.partition(k, axis=1)
            out[j:j + MEDIAN_BLOCK] = block[:, k]

        starts = range(0, d, MEDIAN_BLOCK)
        threads = min(torch.get_num_threads(), len(starts))
        if threads <= 1:
            for j in starts:
                select(j)
        else:
            with ThreadPoolExecutor(threads) as pool:                   # joined here: nothing outlives
                list(pool.map(select, starts))                          # the call (fork-safe)
        return out

    @staticmethod
    def std1(x):
        return x.std(ddof=1)

    @staticmethod
    def sq_norm(x) -> float:
        return float(np.vdot(x, x))

    @staticmethod
    def gram(x):
        return x.T @ x                                                  # numpy dispatches this to syrk

    @staticmethod
    def cholesky(s):
        try:
            low = np.linalg.cholesky(s)
        except np.linalg.LinAlgError:
            return None
        return low if bool((np.diagonal(low) > 0).all()) else None

    eigh = staticmethod(np.linalg.eigh)
    eigvalsh = staticmethod(np.linalg.eigvalsh)
    sqrt = staticmethod(np.sqrt)

    @staticmethod
    def svdvals(m):
        return np.linalg.svd(m, compute_uv=False)

    @staticmethod
    def clamp0(x):
        return np.maximum(x, 0.0)


def array_ops(x) -> type:
    """NumpyOps for a numpy array, else TorchOps."""
    return NumpyOps if isinstance(x, np.ndarray) else TorchOps

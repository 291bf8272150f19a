"""k-means with FAISS: GPU when one is present and asked for, CPU otherwise; works for vectors too."""

from __future__ import annotations

import logging

import numpy as np

from hpcq.errors import QuantizationError

log = logging.getLogger(__name__)


def faiss_gpu_available() -> bool:
    """Whether the installed FAISS was built with GPU support and sees a GPU."""
    import faiss

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def fit_faiss(
    points: np.ndarray,
    k: int,
    *,
    niter: int,
    seed: int,
    max_points_per_centroid: int,
    device: str,
) -> np.ndarray:
    """Fit k centroids to ``points`` (n, d) with ``faiss.Kmeans``; returns (k, d) float32 centroids.

    ``max_points_per_centroid`` = 0 trains on every point: FAISS's own default (256) silently subsamples
    each layer to 256 * k points, which is fast but not what a user asking for k-means on a layer expects.
    """
    try:
        import faiss
    except ImportError as exc:
        raise QuantizationError(
            "the faiss k-means backend needs FAISS: pip install faiss-cpu (or conda install faiss-gpu on a GPU "
            "cluster), or use kmeans.method: exact"
        ) from exc
    use_gpu = device == "cuda" or (device == "auto" and faiss_gpu_available())
    if device == "cuda" and not faiss_gpu_available():
        raise QuantizationError("kmeans.device is cuda but this FAISS build sees no GPU; use auto or cpu")
    n, d = points.shape
    limit = max_points_per_centroid or -(-n // k)
    kmeans = faiss.Kmeans(
        d, k, niter=niter, seed=seed, max_points_per_centroid=limit, gpu=use_gpu, verbose=False
    )
    kmeans.train(np.ascontiguousarray(points, dtype=np.float32))
    log.debug("faiss k-means n=%d d=%d k=%d gpu=%s", n, d, k, use_gpu)
    return np.asarray(kmeans.centroids, dtype=np.float32).reshape(k, d)

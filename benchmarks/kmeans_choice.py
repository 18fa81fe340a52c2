"""faiss's k-means against the numpy Lloyd iteration we would otherwise write, on curate's fit: 40,000
unit vectors of 1,280 floats (Kandinsky 2.2's CLIP), 1,000 clusters, 10 iterations, both threads.

    .venv/bin/python benchmarks/kmeans_choice.py
"""

import argparse
import time

import faiss
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--points", type=int, default=40_000)
parser.add_argument("--dims", type=int, default=1280)
parser.add_argument("--clusters", type=int, default=1000)
args = parser.parse_args()
rng = np.random.default_rng(0)
x = rng.standard_normal((args.points, args.dims), dtype=np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
K, ITERATIONS = args.clusters, 10


def numpy_lloyd():
    centroids = x[rng.choice(len(x), K, replace=False)].copy()
    for _ in range(ITERATIONS):
        nearest = np.argmax(x @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, nearest, x)
        counts = np.bincount(nearest, minlength=K)[:, None]
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return centroids


def faiss_kmeans():
    kmeans = faiss.Kmeans(args.dims, K, niter=ITERATIONS, seed=0, spherical=True, max_points_per_centroid=1 << 20)
    kmeans.train(x)
    return kmeans.centroids


for name, fit in (("faiss", faiss_kmeans), ("numpy", numpy_lloyd)) * 2:
    start = time.perf_counter()
    centroids = fit()
    objective = float(np.max(x @ centroids.T, axis=1).mean())
    print(f"{name}: {time.perf_counter() - start:.1f} s, mean cosine to the nearest centroid {objective:.4f}")

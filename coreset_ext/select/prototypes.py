"""`prototypes`: SSL prototypes (Sorscher et al.): distance of each embedding to its nearest k-means centroid.

`keep="hardest"` (default) keeps the examples farthest from their prototype, `keep="easiest"`
the nearest. Embeddings are L2-normalised first (`normalize=True`), as for contrastive features.
The distance is computed chunked through `reference.kmeans_assign`, never as a full N x K matrix.
"""

from __future__ import annotations

import torch

from coreset_ext import reference
from coreset_ext._validation import Interval, Options, check
from coreset_ext.cluster import KMeans
from coreset_ext.select.registry import register_method, require


@register_method("prototypes")
def prototypes(budget: int, *, n: int, embeddings=None, seed: int = 0, n_clusters: int = 10,
               keep: str = "hardest", normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    x = require("embeddings", embeddings, "prototypes").float()
    check("keep", keep, Options("hardest", "easiest"))
    check("n_clusters", n_clusters, Interval(int, 1, n))  # at most the data set size
    if normalize:
        x = reference.normalize(x)
    km = KMeans(n_clusters, seed=seed).fit(x)
    centers = torch.as_tensor(km.cluster_centers_).to(x.device, x.dtype)
    _, dist = reference.kmeans_assign(x, centers)
    idx = torch.sort(dist.cpu(), descending=(keep == "hardest"), stable=True).indices[:budget]
    return idx, dist.cpu()

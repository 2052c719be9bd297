"""`prototypes`: SSL prototypes (Sorscher et al.): distance of each embedding to its nearest k-means centroid.

Far from the prototype is hard (hard = high). The sampling step is `pruning.sample_by_score`:
`sampling="highest"` (default: the n farthest), "lowest" (the nearest), "double_end" (drop the
farthest floor(beta N) first), "ccs" (`strata` equal-width distance strata, seeded by `seed`)
or "auto" (by budget fraction, `pruning.AUTO_RULE`). `keep="hardest" | "easiest"` is the older
name of "highest" / "lowest" and stays an alias (giving both with different meanings is an
error). The Selection records the sampling used (`options["sampling"]`, "auto" resolved).
Indices come in the order picked (farthest first, nearest first for "lowest"; ties by index).
Embeddings are L2-normalised first (`normalize=True`), as for contrastive features.
The distance is computed chunked through `reference.kmeans_assign`, never as a full N x K matrix.
"""

from __future__ import annotations

import torch

from coreset_ext import reference
from coreset_ext._validation import Interval, check, check_finite
from coreset_ext.cluster import KMeans
from coreset_ext.select import pruning
from coreset_ext.select.registry import register_method, require

KEEP_MEANS = {"hardest": "highest", "easiest": "lowest"}


@register_method("prototypes")
def prototypes(budget: int, *, n: int, embeddings=None, seed: int = 0, n_clusters: int = 10,
               keep: str | None = None, normalize: bool = True, sampling: str | None = None, beta: float = 0.0,
               strata: int = 50) -> tuple[torch.Tensor, torch.Tensor, dict]:
    x = require("embeddings", embeddings, "prototypes").float()
    asked = pruning.sampling_option(sampling, "highest", "keep", keep, KEEP_MEANS)
    pruning.check_sampling(asked, beta=beta, strata=strata)
    check("n_clusters", n_clusters, Interval(int, 1, n))  # at most the data set size
    # rows past 1e17 overflow their float32 norms: normalised to 0, every row one point
    check_finite("embeddings", x, float32_squares=True)
    if normalize:
        x = reference.normalize(x)
    km = KMeans(n_clusters, seed=seed).fit(x)
    centers = torch.as_tensor(km.cluster_centers_).to(x.device, x.dtype)
    _, dist = reference.kmeans_assign(x, centers)
    dist = dist.cpu()
    used = pruning.resolve_sampling(asked, budget, n)
    idx = pruning.sample_by_score(dist, budget, used, hard="high", beta=beta, strata=strata, seed=seed, ranked=True)
    return idx, dist, {"sampling": used}

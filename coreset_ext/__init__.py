"""coreset-ext: fused kernels and selectors for data-efficient contrastive learning.

    import coreset_ext as cx
    tracker = cx.ScoreTracker(len(dataset))      # per-example scores, accumulated in the loop
    criterion = cx.nn.NTXentLoss(temperature=0.5)
    loss = criterion(z1, z2, index=batch_index, tracker=tracker)  # sums and counts, no host sync
    selection = cx.select("css", fraction=0.1, scores=tracker.mean("css"))
    scores = cx.score(pretrained_encoder, dataset, views=4)["css"]   # CSS of any encoder, no training

`python -m coreset_ext info` shows which backend serves each op on this machine.
"""

from coreset_ext import _backend

__version__ = "0.1.0"

_backend.load_extension()  # registers the compiled ops, or warns once how to build them

from coreset_ext import distributed, nn, ops, reference  # noqa: E402
from coreset_ext.cluster import KMeans  # noqa: E402
from coreset_ext.scores import ScoreTracker, TrainingDynamics  # noqa: E402
from coreset_ext.select import Selection, select  # noqa: E402
from coreset_ext.train.data import with_index  # noqa: E402
from coreset_ext.train.embed import score  # noqa: E402
from coreset_ext import active  # noqa: E402  (active learning in realistic pools: cx.active.ActiveLearner)

__all__ = ["KMeans", "ScoreTracker", "Selection", "TrainingDynamics", "active", "distributed", "nn", "ops",
           "reference", "score", "select", "with_index", "__version__"]

"""coreset-ext: fused kernels and selectors for data-efficient contrastive learning.

    import coreset_ext as cx
    tracker = cx.ScoreTracker(len(dataset))      # per-example scores, accumulated in the loop
    cx.ops.score_scatter_add_(buf, index, vals)  # the op behind it

`python -m coreset_ext info` shows which backend serves each op on this machine.
"""

from coreset_ext import _backend

__version__ = "0.1.0"

_backend.load_extension()  # registers the compiled ops, or warns once how to build them

from coreset_ext import ops, reference  # noqa: E402
from coreset_ext.scores import ScoreTracker  # noqa: E402

__all__ = ["ScoreTracker", "ops", "reference", "__version__"]

# --- similarity family / training dynamics (SAS, ELFS) ---
from coreset_ext.scores import TrainingDynamics  # noqa: E402

__all__ += ["TrainingDynamics"]

# --- main job (issue 5): selection API --------------------------------------------------------
from coreset_ext.select import Selection, select  # noqa: E402

__all__ += ["Selection", "select"]

# --- fused contrastive losses (issue 3): loss modules ----------------------------------------
from coreset_ext import nn  # noqa: E402

__all__ += ["nn"]

# ---- kmeans (issue 4) ----
from coreset_ext.cluster import KMeans  # noqa: E402

__all__ += ["KMeans"]

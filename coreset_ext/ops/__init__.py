"""Every public kernel of coreset-ext, one module per family, each op in one order:

    public function (validation; errors name the argument)
      -> custom op (torch.library; the chosen backend passed in as a string)
      -> fake kernel (shapes for torch.compile)
      -> autograd formula (a backward custom op), where the op has a gradient

The backend is chosen by `coreset_ext._backend.resolve` (the same for every op, a constant under
torch.compile); ops whose schema is compiled in `_C` are dispatched by device and served by the
reference where `_C` lacks a kernel (`_backend.define_fallback`). `python -m coreset_ext info`
prints which backend serves each op on this machine. Outside torch.compile the losses call their
implementations through a plain torch.autograd.Function (the same functions, setup and formula
as the custom op; see `contrastive`), which costs a training step less host time.

Families: `scatter` (score_scatter_add_, check_scatter_errors), `similarity` (cosine_rowsum, cosine_topk),
`contrastive` (nt_xent, info_nce_queue, pair_cosine), `mining` (potential_mining), `kmeans` (kmeans_assign, kmeans_update,
kmeans_lloyd_step).
"""

from coreset_ext.ops.contrastive import MIN_TEMPERATURE, info_nce_queue, nt_xent, pair_cosine
from coreset_ext.ops.kmeans import kmeans_assign, kmeans_lloyd_step, kmeans_update
from coreset_ext.ops.mining import potential_mining
from coreset_ext.ops.scatter import check_scatter_errors, score_scatter_add_
from coreset_ext.ops.similarity import TOPK_TRITON_MAX_K, cosine_rowsum, cosine_topk

__all__ = [
    "score_scatter_add_", "check_scatter_errors",
    "cosine_rowsum", "cosine_topk",
    "nt_xent", "info_nce_queue", "pair_cosine", "potential_mining",
    "kmeans_assign", "kmeans_update", "kmeans_lloyd_step",
    "MIN_TEMPERATURE", "TOPK_TRITON_MAX_K",
]

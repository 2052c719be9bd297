"""The one place the trainer computes its contrastive loss and the CSS positive-pair cosines.

It calls the fused ops `coreset_ext.ops.nt_xent` and `coreset_ext.ops.info_nce_queue` (Triton
kernels on the GPU, the chunked reference on the CPU), which also return the cosines.
"""

from __future__ import annotations

import torch

from coreset_ext import ops
from coreset_ext._validation import Options, check


def contrastive_step_loss(
    method: str, p1: torch.Tensor, p2: torch.Tensor, temperature: float, queue: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, positive-pair cosines [B]) for one step.

    simclr: NT-Xent over [p1; p2] (2B rows); cosines cos(p1_i, p2_i).
    moco:   InfoNCE of queries p1 against keys p2 (no gradient) and the `queue` of negatives;
            cosines cos(q_i, k_i).
    Inputs are unnormalised projections; they are normalised inside, in float32.
    """
    check("method", method, Options("simclr", "moco"))
    p1, p2 = p1.float(), p2.float()
    if method == "simclr":
        rows, cos = ops.nt_xent(p1, p2, temperature, reduction="none", return_cos=True)
    else:
        if queue is None:
            raise ValueError("queue: MoCo needs a queue of negatives, got None")
        rows, cos = ops.info_nce_queue(p1, p2, queue.float(), temperature, reduction="none",
                                       return_cos=True)
    return rows.mean(), cos

"""Active learning with contrastive features in realistic pools (METHODS.md, method 5).

    import coreset_ext as cx
    pool = cx.active.make_realistic_pool(train_set, id_classes=range(6), ood_classes=range(6, 10),
                                         ambiguous_fraction=0.2, ood_fraction=0.3, seed=0)
    learner = cx.active.ActiveLearner(pool.dataset, method="contrastive", state_path="al.npz")
    picks = learner.query(40)
    learner.update(picks, *pool.oracle.label(picks))   # labels, kinds ("id", "ood", "ambiguous")

Layering: `active` sits beside `train` (it imports train, select, cluster; the CLI imports it;
nothing below imports it). `pool` builds pools and their oracle, `features` the per-round
contrastive features, `acquire` the methods, `learner` the loop and its saved state, `benchmark`
the comparison `coreset-ext active` runs.
"""

from coreset_ext.active.acquire import METHODS, acquire, id_probability
from coreset_ext.active.benchmark import run_active_benchmark
from coreset_ext.active.features import ContrastiveFeatures, FeatureConfig
from coreset_ext.active.learner import ActiveLearner
from coreset_ext.active.pool import KINDS, Oracle, RealisticPool, make_realistic_pool

__all__ = ["KINDS", "METHODS", "ActiveLearner", "ContrastiveFeatures", "FeatureConfig", "Oracle", "RealisticPool",
           "acquire", "id_probability", "make_realistic_pool", "run_active_benchmark"]

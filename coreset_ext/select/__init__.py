"""Selection methods: one module per method, a registry, and the `Selection` result type.

    import coreset_ext as cx
    sel = cx.select("css", fraction=0.3, scores=tracker.mean()["css"])
    sel.save("css30.npz"); subset = sel.subset(train_set)
"""

from coreset_ext.select.registry import (available_methods, honours_already_selected, needs_labels,
                                         register_method, select, supervised_methods)
from coreset_ext.select.selection import Selection

# Importing the method modules registers them.
from coreset_ext.select import balanced_random, css, elfs, kcenter, prototypes, random, sas, typiclust  # noqa: E402,F401

__all__ = ["Selection", "available_methods", "honours_already_selected", "needs_labels", "register_method", "select",
           "supervised_methods"]

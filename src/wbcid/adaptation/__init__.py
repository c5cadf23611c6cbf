"""Few-shot lab adaptation: learn a new lab from a few cells that a technologist verified.

A model trained on one lab scores 0.44-0.84 macro-F1 on labs it never saw (docs/generalization.md)
and no recipe measured here closes that gap without the new lab's labels. Laboratories verify a
few dozen cells of every new analyser anyway; :func:`adapt` learns the lab from those.

How (the choices were measured against each other: docs/adaptation.md):

* The network is cut into a frozen prefix and the last ``trainable_groups`` layer groups
  (:meth:`wbcid.models.WBCNet.split`). The prefix runs once per augmented view of each verified
  cell and its output is cached, so fine-tuning touches only the suffix and head and takes
  seconds on a CPU.
* Every batch is half new-lab views (classes drawn uniformly, so one basophil counts as much as
  twenty neutrophils) and half *replay*: the model's own training cells, so it does not forget
  the labs it knew. Views come from the training augmentation (stain, colour, blur, geometry).
* The OOD scorer (:mod:`wbcid.ood`) is refitted: the new lab's cells get clusters of their own
  beside the replay cells', and the threshold is calibrated on held-out replay cells and the new
  lab's views together, so the lab's ordinary cells stop being flagged while non-WBCs still are.
  With replay it becomes a :class:`wbcid.ood.LayeredScore`: the penultimate scorer, re-estimated
  on the few replay cells (each class counted as often as in the training data), is averaged with
  scorers of the two frozen layer groups just before the fine-tuned ones, which start from the
  statistics training recorded of them on all its cells. Together they keep the AUROC for PBC's
  non-WBC cells above what the base model had (docs/ood_layers.md, docs/adaptation.md).
* The adapted model predicts over the eight rotations and flips of each cell by default
  (``ModelConfig.tta``; ``--no-tta`` at prediction turns it off): over 40 paired draws it raised
  macro-F1 by 0.010 on average (30 up, 10 down; K = 10: +0.017, 18 of 20 up; docs/adaptation.md).
* ``unlabelled`` cells of the lab may add pseudo-labels: after adapting on the verified cells,
  the most confident half of the unflagged predictions of each class (class-balanced
  self-training, Zou et al., ECCV 2018) join the verified cells for a second adaptation from
  the base model.

:func:`adapt` (``command.py``) is the file-level command (a run directory in, a run directory out,
and a later round that learns from every cell verified so far); :func:`adapt_model`
(``finetune.py``: the steps, the cross-fitted threshold, pseudo-labels) works on decoded images
and is what the benchmark calls; ``replay.py`` caches the frozen prefix's outputs (the replayed
training cells, the verified cells' views); ``flags.py`` refits the OOD score; ``config.py`` holds
:class:`AdaptConfig`.
"""

from .command import adapt, earlier_rounds
from .config import AdaptConfig
from .finetune import PSEUDO_SHARE, adapt_model, fine_tune, pseudo_label, steps_device, suffix_scores
from .flags import refit_ood, with_lab_clusters
from .replay import SCORED_STAGES, Replay, class_shares, decode_replay, make_replay, prefix_views, stage_taps

__all__ = [
    "PSEUDO_SHARE",
    "SCORED_STAGES",
    "AdaptConfig",
    "Replay",
    "adapt",
    "adapt_model",
    "class_shares",
    "decode_replay",
    "earlier_rounds",
    "fine_tune",
    "make_replay",
    "prefix_views",
    "pseudo_label",
    "refit_ood",
    "stage_taps",
    "steps_device",
    "suffix_scores",
    "with_lab_clusters",
]

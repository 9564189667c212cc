"""Data hyper-cleaning with uniopt's torch bilevel ``Dynamic`` (RAD and IAPTT-GM).

Half of the training labels of scikit-learn's bundled digits are replaced by a wrong class.
A weight ``sigmoid(x_i)`` per training sample is learned so that a softmax regression trained
on the weighted noisy data does well on a small clean validation set:

* lower level (LL): ``HC["T"]`` full-batch SGD steps (``torch.optim.SGD`` supplies the rule)
  of ``nn.Linear(64, 10)`` from zero on ``mean_i sigmoid(x_i) CE(model(a_i), y_i)``;
* upper level (UL): the clean validation cross-entropy at the LL solution, minimised over ``x``
  (from 0) by ``torch.optim.Adam``; the hypergradient comes from
  :class:`uniopt.adapters.torch.bilevel.Dynamic`: RAD (through every step) or IAPTT-GM
  (``acquire_max_loss=True``: from the worst iterate ``t*``; ``init_aux=True``: the LL initial
  point is learned too).

The weights are then judged (the same NumPy code for every run, see ``demo.py``): the test
accuracy of the LL solve retrained from zero with them, against the same solve on the noisy
labels, and the precision and recall of the samples they flag as corrupted
(``sigmoid(x_i) < 0.5``). Run: ``python examples/torch_bilevel_hyper_cleaning.py`` (about 12 s on 2
cores, no download); it prints one ``result`` line.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from demo import HC, HC_METHODS, hyper_cleaning_example
from uniopt.adapters.torch.bilevel import Dynamic


class SampleLogits(torch.nn.Module):
    """The UL variables: one logit ``x_i`` per training sample (weight ``sigmoid(x_i)``)."""

    def __init__(self, n: int):
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))


def ll_objective(state):
    """The LL loss: the per-sample weighted training cross-entropy of the LL iterate."""
    losses = F.cross_entropy(state["lower_model"](state["data"]), state["target"],
                             reduction="none")
    return (torch.sigmoid(state["upper_model"].x) * losses).mean()


def ul_objective(state):
    """The UL loss: the clean validation cross-entropy of the LL iterate."""
    return F.cross_entropy(state["lower_model"](state["data"]), state["target"])


def learn_weights(data: dict, method: str = "RAD", ul_lr: float = HC["ul_lr"],
                  outer: int = HC["outer"], steps: int = HC["T"]) -> list[np.ndarray]:
    """Learn the per-sample logits with ``method`` ("RAD" or "IAPTT-GM"), float64.

    Returns:
        ``[x]`` (RAD) or ``[x, W_0, b_0]`` (IAPTT-GM: the learned LL initial point too), NumPy.
    """
    if method not in HC_METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {HC_METHODS})")
    iaptt = method == "IAPTT-GM"
    xtr, xva = (torch.from_numpy(data[k]) for k in ("x_train", "x_val"))
    ytr, yva = (torch.from_numpy(data[k]) for k in ("y_train", "y_val"))
    ll_model = torch.nn.Linear(64, 10, dtype=torch.float64)
    with torch.no_grad():
        for p in ll_model.parameters():
            p.zero_()
    ul_model = SampleLogits(len(ytr))
    dyn = Dynamic(ll_objective, steps, ul_model, ul_objective, ll_model,
                  acquire_max_loss=iaptt, init_aux=iaptt,
                  ll_opt=torch.optim.SGD(ll_model.parameters(), lr=HC["ll_lr"]))
    learned = [ul_model.x] + (list(ll_model.parameters()) if iaptt else [])
    ul_opt = torch.optim.Adam(learned, lr=ul_lr)
    for _ in range(outer):
        ul_opt.zero_grad()
        result = dyn.optimize(xtr, ytr, xva, yva)
        dyn.hypergrad(result, xva, yva)
        ul_opt.step()
    return [p.detach().numpy().copy() for p in learned]


def main() -> dict[str, float]:
    torch.set_num_threads(1)  # small tensors: more threads only add synchronisation
    return hyper_cleaning_example(learn_weights)

if __name__ == "__main__":
    main()

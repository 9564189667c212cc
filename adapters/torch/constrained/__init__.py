"""Constrained learning in PyTorch (Cooper's API): multipliers, formulations, optimizers."""

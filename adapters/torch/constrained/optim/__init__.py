"""Optimizers of constrained learning (Cooper's ``cooper.optim``)."""

"""Constrained learning with Lagrange multipliers, Cooper's API (placeholder of the coptim branch)."""

"""Analyses of the paper's claims: ``gradvar`` (Section 3.3, the variance of the gradients)."""

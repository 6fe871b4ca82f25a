"""Drivers that run the roles together: the DP ablation sweep and diagnostics such as the oracle reward."""

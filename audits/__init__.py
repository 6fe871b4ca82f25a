"""Audits: the privacy ledger, its verification, epsilon recomputation, empirical audits, ablations, reports."""

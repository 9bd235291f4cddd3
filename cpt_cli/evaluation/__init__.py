"""Scoring held-out text, the forgetting report, `cpt eval`, downstream tasks and plots."""

"""Evaluation above training and serving: next-item ranking metrics on held-out users, page quality on
the synthetic world against its exact oracle, and plots."""

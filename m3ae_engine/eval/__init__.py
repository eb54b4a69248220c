"""Evaluation: linear probe, OOD score, reconstructions."""

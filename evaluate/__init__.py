"""Evaluate: splice SAEs into the LM and compute core metrics."""

"""Scoring: perplexity over fixed windows with paired standard errors, HumanEval,
lm-evaluation-harness, and the rounding-noise bar that export checks are held to."""

"""Learned merging: a merged model as a differentiable function of a coefficient table (engine.py)."""

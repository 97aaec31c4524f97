"""Learned merging: a merged model as a differentiable function of a coefficient table (engine.py),
run for every learned method by one driver (driver.py); each method defines only its loss
(merge_ops/methods/adamerging.py, expert_merging.py)."""

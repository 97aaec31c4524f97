"""What the static methods share: the streaming driver (driver.py), the per-tensor contract
(inputs.py), blocked arithmetic (kernels.py), the generalized task-arithmetic core (task_vectors.py),
LiNeS depth scaling (lines.py) and exact top-k selection (topk.py)."""

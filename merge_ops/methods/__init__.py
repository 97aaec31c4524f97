"""Static merge methods: one module per method, each exposing `merge_tensor(x: TensorInputs)`."""

"""LoRA adapters in and out.

In: a PEFT LoRA adapter (a folder or hub repo with `adapter_config.json` + `adapter_model.safetensors`)
is accepted wherever a model is, written `model+adapter` (mergekit's syntax) or, for an expert, as the
adapter alone (applied to the spec's base). It is never merged into a full copy on disk: `reader.py`
reads the base tensor by tensor and adds each target module's `scale · B · A` as it streams
(`open_checkpoint` is the one way the static and learned paths open a model), so every method sees
an adapter as the model it stands for.

Out: `extract.py` writes the difference of two checkpoints as a PEFT adapter (per-module truncated
SVD), which `peft.PeftModel.from_pretrained` loads.

`config.py` reads and checks adapter folders without torch (the API validates specs with it).
"""

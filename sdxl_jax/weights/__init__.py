"""Weight import and export: diffusers folders, single-file (sgm / A1111 / ComfyUI) checkpoints.

``safetensors_io`` streams tensors from and to disk; ``mapping`` names our parameters the way the
reference implementations do; ``loader`` builds a module from a tensor source, tensor by tensor,
straight into the target dtype and sharding.
"""

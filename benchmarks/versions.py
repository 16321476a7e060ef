"""One line naming Python and the versions of the packages the device scripts use (those that
are installed): ``python3 benchmarks/versions.py``."""

import importlib.metadata as md
import platform

NAMES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "torch",
         "diffusers", "transformers", "numpy", "nvidia-cudnn-cu13")  # fmt: skip


def main() -> None:
    found = []
    for name in NAMES:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    print(f"python {platform.python_version()}; " + ", ".join(found))


if __name__ == "__main__":
    main()

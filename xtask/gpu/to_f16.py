"""Writes a safetensors file with every float32 tensor stored in float16, metadata kept.

    python3 xtask/gpu/to_f16.py IN.safetensors OUT.safetensors

Needs the `safetensors` and `numpy` packages.
"""

import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    with safe_open(src, framework="np") as f:
        meta = f.metadata() or {}
        tensors = {
            k: (f.get_tensor(k).astype(np.float16) if f.get_tensor(k).dtype == np.float32
                else f.get_tensor(k))
            for k in f.keys()
        }
    save_file(tensors, dst, metadata=meta)
    print(f"wrote {dst}: {len(tensors)} tensors in float16")


if __name__ == "__main__":
    main()

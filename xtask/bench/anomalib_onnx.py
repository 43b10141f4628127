"""Exports anomalib's DSR with anomalib's own ONNX export (`to_onnx` of its Lightning module, free
batch dimension), for `onnx_runtime.py` to time beside the model `dsr export` writes.

Called by `cargo xtask bench --onnx PYTHON` (the `ort-anomalib-*` rows); can be run by hand:

    python xtask/bench/anomalib_onnx.py OUT_DIR --size 256 [--preset reference|small]
    python xtask/bench/onnx_runtime.py OUT_DIR/weights/onnx/model.onnx --batch 1 --size 256

Needs torch, anomalib==2.7.0 and onnxscript. The model is `torch_reference.build_model` (the same
widths as ours, random weights drawn with seed 0: the work does not depend on their values),
exported at a fixed image size. The last stdout line is a JSON object {"onnx": path, ...}.
"""

import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from anomalib.models import Dsr  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import PRESETS, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    args = parser.parse_args()
    torch.manual_seed(0)
    module = Dsr(pre_processor=False, post_processor=False, evaluator=False, visualizer=False)
    module.model = build_model(args.preset)
    module.eval()
    path = module.to_onnx(args.out_dir, input_size=(args.size, args.size))
    print(
        json.dumps(
            {
                "onnx": str(os.path.abspath(path)),
                "size": args.size,
                "preset": args.preset,
                "anomalib": __import__("anomalib").__version__,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Times a model written by `dsr export` (or anomalib's own export, `anomalib_onnx.py`) in ONNX
Runtime (CPU) the way `cargo run --example bench` times ours: random images in [0, 1], one untimed
warm-up call, then --repeat timed calls; the last stdout line is the same JSON object as the Rust
bench prints.

Called by `cargo xtask bench --onnx PYTHON`; can be run by hand:

    python xtask/bench/onnx_runtime.py model.onnx --batch 1 --size 256 --repeat 5 --threads 2

Needs `pip install onnxruntime numpy`; the model must have a free batch dimension for batches
other than one (`dsr export --dynamic-batch`).
"""

import argparse
import json
import resource
import statistics
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    # `dsr export` names its input "image", anomalib's export "input": take the model's own.
    name = sess.get_inputs()[0].name
    image = np.random.default_rng(0).random((args.batch, 3, args.size, args.size), dtype=np.float32)

    def call() -> None:
        sess.run(None, {name: image})

    call()  # warm-up
    seconds = []
    for _ in range(max(args.repeat, 1)):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    median = statistics.median_low(seconds)
    print(
        json.dumps(
            {
                "mode": "infer",
                "batch": args.batch,
                "size": args.size,
                "runtime": f"onnxruntime {ort.__version__}",
                "threads": args.threads,
                "seconds": seconds,
                "median_s": median,
                "images_per_s": args.batch / median,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


if __name__ == "__main__":
    main()

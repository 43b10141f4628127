"""Runs a model written by `dsr export` in ONNX Runtime and compares its outputs with those of
`dsr predict` on the same images (driven by `cargo xtask onnx-check`, which writes the inputs
and the case description).

usage: parity.py CASE.json

CASE.json: {"onnx": path, "inputs": path of an N×3×H×W float32 .npy (the images as `dsr predict`
decodes and resizes them), "stems": [N output stems], "raw_dir": the --raw predict folder,
"norm_dir": the normalised predict folder or null, "batches": [1, 4], "threads": 2,
"tolerance": 1e-4, "report": path of the JSON report to write}.

Prints the largest absolute difference of every output at every batch size and exits with 1 when
one is above the tolerance (or a label or mask differs away from the threshold).
"""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main() -> int:
    case = json.load(open(sys.argv[1]))
    model = onnx.load(case["onnx"])
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    post = json.loads(meta["dsr.postprocess"]) if "dsr.postprocess" in meta else None

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = case.get("threads", 2)
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(case["onnx"], opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]

    images = np.load(case["inputs"]).astype(np.float32)
    stems = case["stems"]
    raw = json.load(open(f"{case['raw_dir']}/predictions.json"))
    by_stem = {r["map"].rsplit("/", 1)[-1][: -len(".npy")]: r for r in raw["predictions"]}
    expected = {
        "anomaly_map": np.stack([np.load(f"{case['raw_dir']}/{s}.npy") for s in stems]),
        "pred_score": np.array([by_stem[s]["score"] for s in stems], dtype=np.float32),
    }
    if post is not None:
        expected["normalized_anomaly_map"] = np.stack(
            [np.load(f"{case['norm_dir']}/{s}.npy") for s in stems]
        )
        expected["normalized_score"] = np.array(
            [by_stem[s]["normalized_score"] for s in stems], dtype=np.float32
        )
        expected["pred_label"] = np.array([by_stem[s]["label"] == "anomalous" for s in stems])
        # `dsr predict` draws the mask as contours; its rule is the raw map above the threshold.
        expected["pred_mask"] = expected["anomaly_map"] > np.float32(post["pixel_threshold"])
    missing = set(expected) ^ set(names)
    if missing:
        print(f"outputs differ from the expected set: {sorted(missing)}")
        return 1

    tol = case.get("tolerance", 1e-4)
    report = {"onnx": case["onnx"], "images": len(stems), "tolerance": tol, "batches": {}}
    failed = False
    for batch in case["batches"]:
        outs = {n: [] for n in names}
        for start in range(0, len(stems), batch):
            chunk = images[start : start + batch]
            if len(chunk) < batch:
                break
            for n, v in zip(names, sess.run(names, {"image": chunk})):
                outs[n].append(v)
        rows = {}
        for n in names:
            got = np.concatenate(outs[n])
            want = expected[n][: len(got)]
            if got.shape != want.shape:
                print(f"batch {batch}: {n} has shape {got.shape}, expected {want.shape}")
                failed = True
                continue
            if got.dtype == np.bool_:
                differ = got != want
                # A value within the tolerance of its threshold may fall on either side.
                if n == "pred_mask":
                    near = np.abs(expected["anomaly_map"][: len(got)] - post["pixel_threshold"]) < tol
                    differ &= ~near
                if n == "pred_label":
                    near = np.abs(expected["pred_score"][: len(got)] - post["image_threshold"]) < tol
                    differ &= ~near
                rows[n] = {"differing": int(differ.sum())}
                failed |= bool(differ.any())
            else:
                diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
                rows[n] = {"max_abs_diff": diff}
                failed |= not diff <= tol
        report["batches"][str(batch)] = rows
        for n, r in rows.items():
            print(f"batch {batch}  {n:24s} " + ", ".join(f"{k} {v:.3g}" for k, v in r.items()))
    report["passed"] = not failed
    if case.get("report"):
        with open(case["report"], "w") as f:
            json.dump(report, f, indent=1)
    if failed:
        print(f"FAILED: an output differs by more than {tol}")
        return 1
    print(f"ok: every output within {tol} of `dsr predict`")
    return 0


if __name__ == "__main__":
    sys.exit(main())

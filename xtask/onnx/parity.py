"""Runs a model written by `dsr export` in ONNX Runtime and compares its outputs with those of
`dsr predict` on the same images (driven by `cargo xtask onnx-check`, which writes the inputs
and the case description).

usage: parity.py CASE.json

CASE.json: {"onnx": path, "inputs": path of an N×3×H×W float32 .npy (the images as `dsr predict`
decodes and resizes them), "stems": [N output stems], "raw_dir": the --raw predict folder,
"norm_dir": the normalised predict folder or null, "batches": [1, 4], "threads": 2,
"tolerance": 1e-4, "tolerances": {output: a wider bound for that output, with its reason in
"why"}, "reference": optional safetensors file with "input.image" and the reference
implementation's "out.anomaly_map" / "out.pred_score", "report": path of the JSON report}.

Also measured and reported: how far ONNX Runtime's own outputs move when the input moves by one
float step (the conditioning of the network), and, with "reference", how far they are from the
reference implementation's outputs on its input.

Prints the largest absolute difference of every output at every batch size and exits with 1 when
one is above the tolerance (or a label or mask differs away from the threshold).
"""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def read_safetensors(path: str) -> dict:
    """The float32 tensors of a safetensors file (its format: u64 header size, JSON, data)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] != "F32":
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(t["shape"])
    return out


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
    wider = case.get("tolerances") or {}
    report = {"onnx": case["onnx"], "images": len(stems), "tolerance": tol, "batches": {}}
    if wider:
        report["tolerances"] = wider
        report["why"] = case.get("why", "")
    # Conditioning: the runtime against itself, the input moved by one float step.
    base = sess.run(names, {"image": images[:1]})
    moved = sess.run(names, {"image": np.nextafter(images[:1], np.float32(2))})
    report["one_step_input_change"] = {
        n: float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        for n, a, b in zip(names, base, moved)
        if a.dtype != np.bool_
    }
    if case.get("reference"):
        ref = read_safetensors(case["reference"])
        got = dict(zip(names, sess.run(names, {"image": ref["input.image"]})))
        report["reference_implementation"] = {
            n: float(np.max(np.abs(got[n] - ref[f"out.{n}"]))) for n in ("anomaly_map", "pred_score")
        }
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
                failed |= not diff <= wider.get(n, tol)
        report["batches"][str(batch)] = rows
        for n, r in rows.items():
            print(f"batch {batch}  {n:24s} " + ", ".join(f"{k} {v:.3g}" for k, v in r.items()))
    for n, v in report["one_step_input_change"].items():
        print(f"input moved by one float step: {n:24s} moves by {v:.3g}")
    for n, v in report.get("reference_implementation", {}).items():
        print(f"against the reference implementation's output: {n:24s} {v:.3g}")
    report["passed"] = not failed
    if case.get("report"):
        with open(case["report"], "w") as f:
            json.dump(report, f, indent=1)
    if failed:
        print(f"FAILED: an output differs by more than {tol} (or its stated bound {wider})")
        return 1
    print(f"ok: every output within {tol} of `dsr predict`" + (f" (bounds stated for {sorted(wider)})" if wider else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

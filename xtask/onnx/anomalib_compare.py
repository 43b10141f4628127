"""Exports the weights of one of our checkpoints with anomalib's own ONNX export and compares that
model's outputs with the model `dsr export` wrote, both run in ONNX Runtime on the same inputs
(and with anomalib's PyTorch model in eager mode).

usage: anomalib_compare.py CHECKPOINT OURS.onnx INPUTS.npy WORK_DIR

CHECKPOINT: our safetensors checkpoint (it records its configuration); OURS.onnx: `dsr export`
of it; INPUTS.npy: N×3×H×W float32 images in [0, 1] at its image size (as `cargo xtask
onnx-check` writes them). Needs torch, anomalib==2.7.0, onnxscript, onnxruntime.

anomalib's `DsrModel` fixes the U-Net width of its detection and upsampling modules at 64; a
checkpoint of other widths gets modules of its own widths (anomalib's classes) before its
state_dict is loaded, strictly. anomalib's model gives the refined map; a checkpoint that
records `dsr.output_map = detection` is compared on its score only.
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from anomalib.models import Dsr  # noqa: E402
from anomalib.models.image.dsr.torch_model import (  # noqa: E402
    AnomalyDetectionModule,
    DsrModel,
    UpsamplingModule,
)


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        tensors[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(t["shape"])
    return tensors, meta


def run(path, x):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))


def main() -> int:
    ckpt, ours, inputs, work = sys.argv[1:5]
    tensors, meta = read_safetensors(ckpt)
    cfg = json.loads(meta["dsr.config"])
    h, w = json.loads(meta.get("dsr.image_size", "[256, 256]"))
    model = DsrModel(
        latent_anomaly_strength=cfg["latent_anomaly_strength"],
        embedding_dim=cfg["embedding_dim"],
        num_embeddings=cfg["num_embeddings"],
        num_hiddens=cfg["num_hiddens"],
        num_residual_layers=cfg["num_residual_layers"],
        num_residual_hiddens=cfg["num_residual_hiddens"],
    )
    model.anomaly_detection_module = AnomalyDetectionModule(6, 2, cfg["anomaly_detection_module_base_width"])
    model.upsampling_module = UpsamplingModule(8, 2, cfg["upsampling_module_base_width"])
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, strict=True)
    module = Dsr(pre_processor=False, post_processor=False, evaluator=False, visualizer=False)
    module.model = model
    module.eval()
    path = module.to_onnx(work, input_size=(h, w))
    x = np.load(inputs).astype(np.float32)
    theirs = {k: [] for k in ("anomaly_map", "pred_score")}
    mine = {k: [] for k in ("anomaly_map", "pred_score")}
    eager = {k: [] for k in ("anomaly_map", "pred_score")}
    for i in range(len(x)):
        t = run(str(path), x[i : i + 1])
        o = run(ours, x[i : i + 1])
        with torch.inference_mode():
            e = model(torch.from_numpy(x[i : i + 1]))
        for k in theirs:
            theirs[k].append(np.asarray(t[k]).reshape(o[k].shape))
            mine[k].append(o[k])
            eager[k].append(getattr(e, k).numpy().reshape(o[k].shape))
    keys = ["pred_score"] if meta.get("dsr.output_map") == "detection" else ["anomaly_map", "pred_score"]
    report = {"checkpoint": ckpt, "anomalib_onnx": str(path), "images": len(x)}
    for k in keys:
        a, b, c = (np.concatenate(v[k]) for v in (theirs, mine, eager))
        report[k] = {
            "anomalib_onnx_vs_ours_onnx": float(np.abs(a - b).max()),
            "anomalib_onnx_vs_anomalib_eager": float(np.abs(a - c).max()),
            "ours_onnx_vs_anomalib_eager": float(np.abs(b - c).max()),
        }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

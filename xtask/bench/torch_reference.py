"""Times anomalib's DSR (PyTorch eager) the way `cargo run --example bench` times ours.

Called by `cargo xtask bench --torch PYTHON`; can be run by hand:

    python xtask/bench/torch_reference.py infer --batch 1 --size 256 --repeat 5
    python xtask/bench/torch_reference.py infer --batch 8 --size 256 --device cuda
    python xtask/bench/torch_reference.py phase2 --batch 8 --size 128 --preset small

Needs `pip install torch anomalib==2.7.0`. Random weights and images, one untimed warm-up call,
then --repeat timed calls; the last stdout line is the same JSON object as the Rust bench prints.
Training steps are anomalib's own phase-2 / phase-3 step (model forward, its loss, backward, Adam)
with random binary maps in place of anomalib's Perlin generator, so the time is the network's;
ours draws its Perlin masks inside the step (a few milliseconds per batch), which favours PyTorch
slightly.

`--preset small` builds the model at the widths of `dsr_train::pipeline::small_model()` (see
`build_model`): anomalib's `DsrModel` constructor takes the discrete model's and the subspace
restriction modules' widths but fixes both U-Nets at base width 64, so those two modules are
replaced by anomalib's own `AnomalyDetectionModule` / `UpsamplingModule` classes at base width 16.
"""

import argparse
import json
import resource
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from anomalib.models.image.dsr.loss import DsrSecondStageLoss, DsrThirdStageLoss  # noqa: E402
from anomalib.models.image.dsr.torch_model import (  # noqa: E402
    AnomalyDetectionModule,
    DsrModel,
    UpsamplingModule,
)

# The model configurations of `--preset`: `dsr_core::DsrConfig::default()` (anomalib's defaults)
# and `dsr_train::pipeline::small_model()`. The U-Net widths are not constructor arguments of
# anomalib's `DsrModel` (it fixes them at 64): `build_model` swaps in modules of the width asked.
PRESETS = {
    "reference": dict(
        embedding_dim=128,
        num_embeddings=4096,
        num_hiddens=128,
        num_residual_layers=2,
        num_residual_hiddens=64,
        unet_base_width=64,
    ),
    "small": dict(
        embedding_dim=32,
        num_embeddings=256,
        num_hiddens=32,
        num_residual_layers=2,
        num_residual_hiddens=16,
        unet_base_width=16,
    ),
}


def build_model(preset: str) -> DsrModel:
    """anomalib's DSR at the widths of our configuration `preset` (random weights)."""
    widths = dict(PRESETS[preset])
    unet = widths.pop("unet_base_width")
    model = DsrModel(latent_anomaly_strength=0.2, **widths)
    if unet != 64:
        # 6 input channels (image and its reconstruction), 2 output; then 6 + the 2 map channels.
        model.anomaly_detection_module = AnomalyDetectionModule(6, 2, unet)
        model.upsampling_module = UpsamplingModule(8, 2, unet)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["infer", "phase2", "phase3"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    model = build_model(args.preset).to(dev)
    image = torch.rand(args.batch, 3, args.size, args.size, device=dev)

    if args.mode == "infer":
        model.eval()

        def call() -> None:
            with torch.inference_mode():
                model(image)
            sync()

    elif args.mode == "phase2":
        model.train()
        loss_fn = DsrSecondStageLoss()
        opt = torch.optim.Adam(
            list(model.image_reconstruction_network.parameters())
            + list(model.subspace_restriction_module_hi.parameters())
            + list(model.subspace_restriction_module_lo.parameters())
            + list(model.anomaly_detection_module.parameters()),
            lr=2e-4,
        )

        def call() -> None:
            mask = (torch.rand(args.batch, 1, args.size, args.size, device=dev) > 0.7).float()
            out = model(image, mask)
            loss = loss_fn(
                out["recon_feat_hi"],
                out["recon_feat_lo"],
                out["embedding_bot"],
                out["embedding_top"],
                image,
                out["obj_spec_image"],
                out["anomaly_map"],
                out["true_anomaly_map"],
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync()

    else:
        model.train()
        loss_fn = DsrThirdStageLoss()
        opt = torch.optim.Adam(model.upsampling_module.parameters(), lr=2e-4)

        def call() -> None:
            mask = (torch.rand(args.batch, 1, args.size, args.size, device=dev) > 0.7).float()
            out = model(image)
            loss = loss_fn(out["anomaly_map"], mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync()

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
                "mode": args.mode,
                "batch": args.batch,
                "size": args.size,
                "preset": args.preset,
                "device": args.device,
                "seconds": seconds,
                "median_s": median,
                "images_per_s": args.batch / median,
                # ru_maxrss is in KiB on Linux.
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                # The caching allocator's peak (GPU only; the process's whole use, context
                # included, is read with nvidia-smi by the caller).
                "peak_cuda_allocated_bytes": torch.cuda.max_memory_allocated()
                if dev.type == "cuda"
                else 0,
            }
        )
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Prepares .gpu/ (ignored by git) for xtask/gpu/run.sh on a CUDA machine without a Rust
# toolchain: the CUDA build of `dsr`, `device_check` and `bench` (stripped, xz-compressed), a
# trained demo model, the phase-1 image pool, a magnetic_tile subset and the Python wheels that
# anomalib 2.7.0's DSR needs beyond a PyTorch image (docs/gpu.md).
#
#   bash xtask/gpu/build.sh DATA_DIR DEMO_MODEL SKIMAGE_DATA_DIR
#
# DATA_DIR holds magnetic_tile (MVTec layout); DEMO_MODEL is a `dsr demo` model.safetensors, or
# `-` to have run.sh train the demo on the GPU first; SKIMAGE_DATA_DIR is scikit-image's bundled
# data folder (skimage/data of its wheel).
# Needs a CUDA toolkit (nvcc) here. CUDA 11.8's nvcc cannot target sm_90a, which candle's kernel
# build picks for compute capability 9.0, so the kernels are built as PTX for 8.9 and the driver
# compiles them for the GPU at load time; the CUDA libraries are bound as CUDA 13's (the
# target machine's), found at run time.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:?DATA_DIR}
DEMO=${2:?DEMO_MODEL}
SKI=${3:?SKIMAGE_DATA_DIR}
TARGET=${CARGO_TARGET_DIR_GPU:-target/cuda}
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-89}
cargo build --release --target-dir "$TARGET" -p dsr-cli --features cuda
cargo build --release --target-dir "$TARGET" -p dsr-train --features cuda --example device_check
cargo build --release --target-dir "$TARGET" -p dsr-rs --features dsr-train/cuda --example bench
mkdir -p .gpu
# The binaries import a few cuBLAS, cuRAND and CUDA-runtime functions directly, with this
# toolkit's library versions: they are pointed at plain library names that run.sh links to the
# target machine's libraries, their symbol versions cleared; the runtime functions (used only by
# candle's quantized kernels, never by DSR) come from a stand-in library (cudart_stub.c).
gcc -shared -fPIC -O2 -Wl,-soname,libcudart_stub.so -o .gpu/libcudart_stub.so xtask/gpu/cudart_stub.c
for b in dsr examples/device_check examples/bench; do
  name=$(basename "$b")
  strip -o ".gpu/$name" "$TARGET/release/$b"
  args=()
  for lib in $(readelf -d ".gpu/$name" | grep -oE 'lib(cudart|cublas|curand)\.so[.0-9]*'); do
    case $lib in
    libcudart*) args+=(--replace-needed "$lib" libcudart_stub.so) ;;
    *) args+=(--replace-needed "$lib" "${lib%%.so*}.so") ;;
    esac
  done
  for sym in $(nm -D --undefined-only ".gpu/$name" | grep -oE '[A-Za-z0-9_]+@lib(cudart|cublas|curand)' | cut -d@ -f1); do
    args+=(--clear-symbol-version "$sym")
  done
  [ ${#args[@]} -gt 0 ] && patchelf "${args[@]}" ".gpu/$name"
  python3 xtask/gpu/weak_versions.py ".gpu/$name" libcudart libcublas libcurand
  xz -T0 -6 -f ".gpu/$name"
done
if [ "$DEMO" != - ]; then cp "$DEMO" .gpu/demo.safetensors; fi

# Phase-1 pool: scikit-image's public-domain / CC0 sample images and the battery_weld training
# images (Apache-2.0), docs/gpu.md.
mkdir -p .gpu/pool/skimage
rm -rf .gpu/pool/battery_weld
ln -s ../../assets/demo/battery_weld/train/good .gpu/pool/battery_weld
for n in astronaut brick camera cell chelsea clock_motion coffee coins grass gravel horse \
  hubble_deep_field ihc microaneurysms retina rocket text; do
  cp "$SKI"/"$n".* .gpu/pool/skimage/
done

# magnetic_tile: every third training and test image (the carried tree has a
# size limit).
python3 - "$DATA/magnetic_tile" .gpu/magnetic_tile <<'EOF'
import glob, os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
shutil.rmtree(dst, ignore_errors=True)
def cp(a, b):
    os.makedirs(os.path.dirname(b), exist_ok=True)
    shutil.copy(a, b)
for i, f in enumerate(sorted(glob.glob(f"{src}/train/good/*.png"))):
    if i % 3 == 0:
        cp(f, f"{dst}/train/good/{os.path.basename(f)}")
for d in sorted(os.listdir(f"{src}/test")):
    for i, f in enumerate(sorted(glob.glob(f"{src}/test/{d}/*.png"))):
        if i % 3 == 0:
            cp(f, f"{dst}/test/{d}/{os.path.basename(f)}")
            if d != "good":
                stem = os.path.basename(f)[:-4]
                cp(f"{src}/ground_truth/{d}/{stem}_mask.png",
                   f"{dst}/ground_truth/{d}/{stem}_mask.png")
EOF

# anomalib 2.7.0 and what its DSR imports that a PyTorch image lacks (FrEIA ships as an sdist:
# built into a wheel here).
mkdir -p .gpu/wheels
P=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for w in anomalib==2.7.0 docstring_parser==0.18.0 httpcore2==2.16.2 httpx2==2.16.2 \
  jsonargparse==4.46.0 kornia==0.9.0 kornia_rs==0.2.0 omegaconf==2.4.0 platformdirs==4.14.9 \
  rich-argparse==1.8.0 truststore==0.10.5 typeshed_client==2.15.0 tzdata==2026.6; do
  python3 -m pip download -q --no-deps --only-binary=:all: "${P[@]}" -d .gpu/wheels "$w"
done
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tmp" FrEIA==0.2
python3 -m pip wheel -q --no-deps "$tmp"/FrEIA-0.2.tar.gz -w .gpu/wheels
du -sh .gpu

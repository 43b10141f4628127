"""Compares two `dsr predict --raw` output folders (the same model and images on two devices).

    python3 xtask/gpu/compare_predictions.py CPU_DIR CUDA_DIR

Prints the largest absolute difference of the maps (.npy, per image and over all), of the
scores (predictions.csv), and how many predicted labels differ. Needs numpy.
"""

import csv
import pathlib
import sys

import numpy as np


def scores(folder: pathlib.Path) -> dict:
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    key = next(k for k in rows[0] if "score" in k.lower())
    label = next((k for k in rows[0] if "label" in k.lower()), None)
    name = next(k for k in rows[0] if k.lower() in ("path", "image", "file", "input"))
    return {r[name]: (float(r[key]), r.get(label) if label else None) for r in rows}


def main() -> None:
    a, b = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    maps_a = sorted(a.glob("*.npy"))
    worst, total, mean_acc = 0.0, 0, 0.0
    for pa in maps_a:
        pb = b / pa.name
        if not pb.exists():
            print(f"{pa.name}: missing in {b}")
            continue
        ma, mb = np.load(pa), np.load(pb)
        d = np.abs(ma.astype(np.float64) - mb.astype(np.float64))
        worst = max(worst, float(d.max()))
        mean_acc += float(d.mean())
        total += 1
    sa, sb = scores(a), scores(b)
    dscore = max(abs(sa[k][0] - sb[k][0]) for k in sa)
    flips = sum(1 for k in sa if sa[k][1] != sb[k][1])
    print(
        f"maps: {total} images, max abs diff {worst:.3e}, mean abs diff "
        f"{mean_acc / max(total, 1):.3e}; scores: max abs diff {dscore:.3e}; "
        f"labels differing: {flips} of {len(sa)}"
    )


if __name__ == "__main__":
    main()

//! Affine resampling with the border conventions of torchvision and OpenCV.

/// Interpolation and border handling of an inverse-mapped warp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interp {
    /// `grid_sample` nearest (round half to even), outside pixels filled with 0.
    Nearest,
    /// torchvision bilinear with `fill=0`: zero padding, then the result is multiplied by the
    /// interpolated in-bounds weight (torchvision samples an extra channel of ones for this).
    BilinearTorch,
    /// OpenCV `warpAffine` bilinear with a constant 0 border: outside neighbours count as 0.
    BilinearZero,
}

/// An inverse map in pixel-index coordinates: source x = m[0]·x + m[1]·y + m[2], source
/// y = m[3]·x + m[4]·y + m[5], where x is the column and y the row of the output pixel.
pub(crate) type Inverse = [f32; 6];

/// The inverse map of a rotation by `degrees` about the image centre ((w−1)/2, (h−1)/2).
///
/// The convention is torchvision's: a positive angle turns the content counter-clockwise on screen.
pub(crate) fn rotation(h: usize, w: usize, degrees: f32) -> Inverse {
    let (s, c) = degrees.to_radians().sin_cos();
    let cx = (w as f32 - 1.0) * 0.5;
    let cy = (h as f32 - 1.0) * 0.5;
    // Source = centre + R · (output − centre) with R = [[c, s], [−s, c]].
    [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy]
}

/// Warps every `h`×`w` plane of `src` (a multiple of `h * w` long) into `dst`.
pub(crate) fn warp_planes(
    src: &[f32],
    dst: &mut [f32],
    h: usize,
    w: usize,
    m: &Inverse,
    interp: Interp,
) {
    let plane = h * w;
    for (s, d) in src.chunks_exact(plane).zip(dst.chunks_exact_mut(plane)) {
        warp_plane(s, d, h, w, m, interp);
    }
}

fn warp_plane(src: &[f32], dst: &mut [f32], h: usize, w: usize, m: &Inverse, interp: Interp) {
    let (wf, hf) = (w as f32, h as f32);
    for (y, row) in dst.chunks_exact_mut(w).enumerate() {
        let yf = y as f32;
        let bx = m[1] * yf + m[2];
        let by = m[4] * yf + m[5];
        for (x, out) in row.iter_mut().enumerate() {
            let xf = x as f32;
            let sx = m[0] * xf + bx;
            let sy = m[3] * xf + by;
            *out = match interp {
                Interp::Nearest => {
                    let rx = sx.round_ties_even();
                    let ry = sy.round_ties_even();
                    if rx >= 0.0 && ry >= 0.0 && rx < wf && ry < hf {
                        src[ry as usize * w + rx as usize]
                    } else {
                        0.0
                    }
                }
                Interp::BilinearTorch | Interp::BilinearZero => {
                    if sx <= -1.0 || sy <= -1.0 || sx >= wf || sy >= hf {
                        0.0
                    } else {
                        let x0 = sx.floor();
                        let y0 = sy.floor();
                        let ax = sx - x0;
                        let ay = sy - y0;
                        let (x0, y0) = (x0 as isize, y0 as isize);
                        let mut value = 0.0;
                        let mut weight = 0.0;
                        for (dy, wy) in [(0, 1.0 - ay), (1, ay)] {
                            let yy = y0 + dy;
                            if yy < 0 || yy >= h as isize {
                                continue;
                            }
                            for (dx, wx) in [(0, 1.0 - ax), (1, ax)] {
                                let xx = x0 + dx;
                                if xx < 0 || xx >= w as isize {
                                    continue;
                                }
                                value += wy * wx * src[yy as usize * w + xx as usize];
                                weight += wy * wx;
                            }
                        }
                        if interp == Interp::BilinearTorch {
                            value * weight
                        } else {
                            value
                        }
                    }
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rotation_is_identity() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        for interp in [Interp::Nearest, Interp::BilinearTorch, Interp::BilinearZero] {
            let mut dst = vec![0.0; 12];
            warp_planes(&src, &mut dst, 3, 4, &rotation(3, 4, 0.0), interp);
            for (a, b) in src.iter().zip(&dst) {
                assert!((a - b).abs() < 1e-5, "{interp:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn half_turn_reverses_a_square() {
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let mut dst = vec![0.0; 16];
        warp_planes(
            &src,
            &mut dst,
            4,
            4,
            &rotation(4, 4, 180.0),
            Interp::Nearest,
        );
        let reversed: Vec<f32> = src.iter().rev().copied().collect();
        assert_eq!(dst, reversed);
    }
}

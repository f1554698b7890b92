// Mat-vec for one token (decode), f16 or f32 weights. A workgroup computes ROWS consecutive
// rows of one group. Invocation i takes the 8-column slices i, i + WG, ... of the input,
// token-shifts it once and applies it to all ROWS rows (16 contiguous bytes of f16 per row,
// coalesced across the workgroup); the workgroup then sums the partial dots.

@compute @workgroup_size(WG)
fn main(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let at = locate(flat_id(wid, nwg), ROWS, 1u);
    if at.x >= p.n_groups {
        return;
    }
    let g = p.groups[at.x];
    let row0 = at.y * ROWS;
    let k4 = g.k / 4u;
    var acc: array<f32, ROWS>;
    for (var s = lane.index; s < g.k / 8u; s += WG) {
        let xa = load_x4(g, 0u, 8u * s);
        let xb = load_x4(g, 0u, 8u * s + 4u);
        for (var r = 0u; r < ROWS; r++) {
            let base = g.w_off + min(row0 + r, g.m - 1u) * k4 + 2u * s;  // rows past M repeat the last
            acc[r] += dot(w4(w[base]), xa) + dot(w4(w[base + 1u]), xb);
        }
    }
    for (var r = 0u; r < ROWS; r += 4u) {
        let total = sum4(vec4<f32>(acc[r], acc[r + 1u], acc[r + 2u], acc[r + 3u]), lane);
        let row = row0 + r + lane.index;
        if lane.index < 4u && row < g.m {
            store(g, 0u, row, total[lane.index]);
        }
    }
}

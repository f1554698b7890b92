// Mat-vec for one token (decode), f16 or f32 weights. A workgroup computes 8 consecutive rows
// of one group. Invocation i takes the 8-column slices i, i + WG, ... of the input,
// token-shifts it once and applies it to all 8 rows (16 contiguous bytes of f16 per row,
// coalesced across the workgroup); the workgroup then sums the partial dots.

// Dot of 8 columns (W4 elements base, base + 1) with the inputs (xa, xb).
fn dot8(base: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    return dot(w4(w[base]), xa) + dot(w4(w[base + 1u]), xb);
}

@compute @workgroup_size(WG)  // ROWS = 8
fn main(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let at = locate(flat_id(wid, nwg), ROWS, 1u);
    if at.x >= p.n_groups {
        return;
    }
    let g = p.groups[at.x];
    let row0 = at.y * ROWS;
    let k4 = g.k / 4u;
    // W4 offset of each row; rows past M repeat the last one (their sums are not stored).
    let last = g.m - 1u;
    let r0 = g.w_off + vec4<u32>(min(row0, last), min(row0 + 1u, last), min(row0 + 2u, last), min(row0 + 3u, last)) * k4;
    let r1 = g.w_off + vec4<u32>(min(row0 + 4u, last), min(row0 + 5u, last), min(row0 + 6u, last), min(row0 + 7u, last)) * k4;
    var acc0 = vec4<f32>(0.0);  // rows row0 .. row0 + 3
    var acc1 = vec4<f32>(0.0);  // rows row0 + 4 .. row0 + 7
    for (var s = lane.index; s < g.k / 8u; s += WG) {
        let xa = load_x4(g, 0u, 8u * s);
        let xb = load_x4(g, 0u, 8u * s + 4u);
        let o = 2u * s;
        acc0 += vec4<f32>(dot8(r0.x + o, xa, xb), dot8(r0.y + o, xa, xb), dot8(r0.z + o, xa, xb), dot8(r0.w + o, xa, xb));
        acc1 += vec4<f32>(dot8(r1.x + o, xa, xb), dot8(r1.y + o, xa, xb), dot8(r1.z + o, xa, xb), dot8(r1.w + o, xa, xb));
    }
    let total0 = sum4(acc0, lane);
    let total1 = sum4(acc1, lane);
    if lane.index < ROWS && row0 + lane.index < g.m {
        store(g, 0u, row0 + lane.index, select(total1[lane.index % 4u], total0[lane.index % 4u], lane.index < 4u));
    }
}

// Mat-vec for one token (decode), f16 or f32 weights. A workgroup computes 8 consecutive rows
// of one group. Invocation i takes the 8-column slices i, i + WG, ... of the input,
// token-shifts it once and applies it to all 8 rows (16 contiguous bytes of f16 per row,
// coalesced across the workgroup); the workgroup then sums the partial dots.

// Dot of 8 columns (W4 elements base, base + 1) with the inputs (xa, xb).
fn dot8(base: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    return dot(w4(w[base]), xa) + dot(w4(w[base + 1u]), xb);
}

// dot8 for 4 rows.
fn dot8x4(bases: vec4<u32>, xa: vec4<f32>, xb: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot8(bases.x, xa, xb), dot8(bases.y, xa, xb), dot8(bases.z, xa, xb), dot8(bases.w, xa, xb));
}

const ROWS: u32 = 8u;  // rows per workgroup, in two vec4 accumulators (ops.MATVEC_ROWS)

@compute @workgroup_size(WG)
fn main(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let at = locate(flat_id(wid, nwg), ROWS, 1u);
    if at.x >= p.n_groups {
        return;
    }
    let g = p.groups[at.x];
    let row0 = at.y * ROWS;
    let r0 = row_bases(g, row0, 0u, g.k / 4u);
    let r1 = row_bases(g, row0, 1u, g.k / 4u);
    var acc0 = vec4<f32>(0.0);  // rows row0 .. row0 + 3
    var acc1 = vec4<f32>(0.0);  // rows row0 + 4 .. row0 + 7
    for (var s = lane.index; s < g.k / 8u; s += WG) {
        let xa = load_x4(g, 0u, 8u * s);
        let xb = load_x4(g, 0u, 8u * s + 4u);
        let o = 2u * s;
        acc0 += dot8x4(r0 + o, xa, xb);
        acc1 += dot8x4(r1 + o, xa, xb);
    }
    store_rows8(g, row0, acc0, acc1, lane);
}

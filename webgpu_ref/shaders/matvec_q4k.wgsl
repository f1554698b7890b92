// Mat-vec for one token (decode) on Q4_K weights. A workgroup computes 8 consecutive rows of
// one group. Eight invocations share a super-block, and invocation part p = index % 8 takes the
// same share of every super-block it visits: qs chunk c = p / 2, half h = p % 2, i.e. W4 1 + p
// of the block, the low nibbles of sub-block 2c (columns 64c + 16h + 0..15) and the high
// nibbles of sub-block 2c + 1 (the same + 32). So its scale shifts are set once, and nothing
// is indexed at run time. Each step loads the header and nibble words of all 8 rows, then its
// 32 inputs (once for the 8 rows), then computes. Per sub-block the min term factors out:
// sum (d*sc*q - dmin*m) x = d*sc*(q . x) - dmin*m*sum(x).

// This invocation's 32 inputs of one super-block.
struct Inputs {
    lo: array<vec4<f32>, 4>,  // under the low nibbles of nibble words 0..3
    hi: array<vec4<f32>, 4>,  // under the high nibbles
    sums: vec2<f32>,  // (sum lo, sum hi)
}

fn load_inputs(g: Group, col: u32) -> Inputs {
    let lo = array<vec4<f32>, 4>(load_x4(g, 0u, col), load_x4(g, 0u, col + 4u),
                                 load_x4(g, 0u, col + 8u), load_x4(g, 0u, col + 12u));
    let hi = array<vec4<f32>, 4>(load_x4(g, 0u, col + 32u), load_x4(g, 0u, col + 36u),
                                 load_x4(g, 0u, col + 40u), load_x4(g, 0u, col + 44u));
    let one = vec4<f32>(1.0);
    return Inputs(lo, hi, vec2<f32>(dot(lo[0] + lo[1] + lo[2] + lo[3], one), dot(hi[0] + hi[1] + hi[2] + hi[3], one)));
}

// Header and this invocation's nibble word of 4 rows in one super-block.
struct Words4 {
    head: array<W4, 4>,
    q: array<W4, 4>,
}

// `blocks`: the rows' super-blocks (W4 index); `part`: this invocation's share.
fn load_words4(blocks: vec4<u32>, part: u32) -> Words4 {
    let q = blocks + 1u + part;
    return Words4(array<W4, 4>(w[blocks.x], w[blocks.y], w[blocks.z], w[blocks.w]),
                  array<W4, 4>(w[q.x], w[q.y], w[q.z], w[q.w]));
}

// sum f x over the 16 low (or high) nibbles of `q` (f = 1 + q/16, nibble_floats).
fn nibble_dot(q: W4, x: array<vec4<f32>, 4>, left: vec4<u32>, right: vec4<u32>) -> f32 {
    return dot(nibble_floats(q.x, left, right), x[0]) + dot(nibble_floats(q.y, left, right), x[1])
         + dot(nibble_floats(q.z, left, right), x[2]) + dot(nibble_floats(q.w, left, right), x[3]);
}

// This invocation's share of one row.
fn q4k_dot(head: W4, q: W4, x: Inputs, sh: ScaleShifts) -> f32 {
    let d = unpack2x16float(head.x);
    let sm = scales_mins(head, sh);  // (sc_lo, sc_hi, m_lo, m_hi)
    let fx = vec2<f32>(nibble_dot(q, x.lo, LOW_LEFT, LOW_RIGHT), nibble_dot(q, x.hi, HIGH_LEFT, HIGH_RIGHT));
    return 16.0 * d.x * dot(sm.xy, fx - x.sums) - d.y * dot(sm.zw, x.sums);
}

// q4k_dot for 4 rows.
fn q4k_dot4(rows: Words4, x: Inputs, sh: ScaleShifts) -> vec4<f32> {
    return vec4<f32>(q4k_dot(rows.head[0], rows.q[0], x, sh), q4k_dot(rows.head[1], rows.q[1], x, sh),
                     q4k_dot(rows.head[2], rows.q[2], x, sh), q4k_dot(rows.head[3], rows.q[3], x, sh));
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
    let nb = g.k / 256u;  // super-blocks per row
    let r0 = row_bases(g, row0, 0u, nb * Q4K_BLOCK);
    let r1 = row_bases(g, row0, 1u, nb * Q4K_BLOCK);
    let part = lane.index % 8u;
    let sh = scale_shifts(part / 2u);
    let col = 64u * (part / 2u) + 16u * (part % 2u);  // first input column in each super-block
    var acc0 = vec4<f32>(0.0);  // rows row0 .. row0 + 3
    var acc1 = vec4<f32>(0.0);  // rows row0 + 4 .. row0 + 7
    for (var b = lane.index / 8u; b < nb; b += WG / 8u) {
        let o = b * Q4K_BLOCK;
        let rows0 = load_words4(r0 + o, part);
        let rows1 = load_words4(r1 + o, part);
        let x = load_inputs(g, 256u * b + col);
        acc0 += q4k_dot4(rows0, x, sh);
        acc1 += q4k_dot4(rows1, x, sh);
    }
    store_rows8(g, row0, acc0, acc1, lane);
}

// Mat-vec for one token (decode) on Q4_K weights. A workgroup computes 8 consecutive rows of
// one group. Eight invocations share a super-block: invocation part p reads qs bytes
// 16p..16p+15 (one vec4<u32>, 32 weights: 16 low nibbles of sub-block 2c and 16 high nibbles
// of sub-block 2c + 1, c = p / 2) plus the block's 16-byte header; it loads its 32 inputs once
// and applies them to all 8 rows. Per sub-block the min term factors out:
// sum (d*sc*q - dmin*m) x = d*sc*(q . x) - dmin*m*sum(x).

struct Slice {
    xl: array<vec4<f32>, 4>,  // inputs under the low nibbles
    xh: array<vec4<f32>, 4>,  // inputs under the high nibbles
    sums: vec2<f32>,  // (sum xl, sum xh)
    c: u32,  // qs chunk
    h: u32,  // which half of the chunk
}

// This invocation's share of one row: `block` is the row's super-block (W4 index).
fn q4k_dot(block: u32, s: Slice) -> f32 {
    let head = w[block];
    let q = w[block + 1u + 2u * s.c + s.h];
    let d = unpack2x16float(head.x);
    let sl = scale_min(head, 2u * s.c);
    let sh = scale_min(head, 2u * s.c + 1u);
    var dl = 0.0;
    var dh = 0.0;
    for (var j = 0u; j < 4u; j++) {
        dl += dot(nibbles(q[j], false), s.xl[j]);
        dh += dot(nibbles(q[j], true), s.xh[j]);
    }
    return d.x * (sl.x * dl + sh.x * dh) - d.y * dot(vec2<f32>(sl.y, sh.y), s.sums);
}

// q4k_dot for 4 rows.
fn q4k_dot4(blocks: vec4<u32>, s: Slice) -> vec4<f32> {
    return vec4<f32>(q4k_dot(blocks.x, s), q4k_dot(blocks.y, s), q4k_dot(blocks.z, s), q4k_dot(blocks.w, s));
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
    var acc0 = vec4<f32>(0.0);  // rows row0 .. row0 + 3
    var acc1 = vec4<f32>(0.0);  // rows row0 + 4 .. row0 + 7
    for (var u = lane.index; u < nb * 8u; u += WG) {
        var s: Slice;
        s.c = (u % 8u) / 2u;
        s.h = u % 2u;
        let col = 256u * (u / 8u) + 64u * s.c + 16u * s.h;  // low nibbles: col..col+15; high: col+32..col+47
        for (var j = 0u; j < 4u; j++) {
            s.xl[j] = load_x4(g, 0u, col + 4u * j);
            s.xh[j] = load_x4(g, 0u, col + 32u + 4u * j);
        }
        let one = vec4<f32>(1.0);
        s.sums = vec2<f32>(dot(s.xl[0] + s.xl[1] + s.xl[2] + s.xl[3], one),
                           dot(s.xh[0] + s.xh[1] + s.xh[2] + s.xh[3], one));
        let o = (u / 8u) * Q4K_BLOCK;
        acc0 += q4k_dot4(r0 + o, s);
        acc1 += q4k_dot4(r1 + o, s);
    }
    let total0 = sum4(acc0, lane);
    let total1 = sum4(acc1, lane);
    if lane.index < ROWS && row0 + lane.index < g.m {
        let total = select(total1, total0, lane.index < 4u);
        store(g, 0u, row0 + lane.index, total[lane.index % 4u]);
    }
}

// Mat-vec for one token (decode) on Q4_K weights. A workgroup computes ROWS consecutive rows
// of one group. Eight invocations share a super-block: invocation part p reads qs bytes
// 16p..16p+15 (one vec4<u32>, 32 weights: 16 low nibbles of sub-block 2c and 16 high nibbles of
// sub-block 2c + 1, c = p / 2) plus the block's 16-byte header; it loads its 32 inputs once and
// applies them to all ROWS rows. Per sub-block the min term factors out:
// sum (d*sc*q - dmin*m) x = d*sc*(q . x) - dmin*m*sum(x).

@compute @workgroup_size(WG)
fn main(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let at = locate(flat_id(wid, nwg), ROWS, 1u);
    if at.x >= p.n_groups {
        return;
    }
    let g = p.groups[at.x];
    let row0 = at.y * ROWS;
    let nb = g.k / 256u;  // super-blocks per row
    var acc: array<f32, ROWS>;
    for (var u = lane.index; u < nb * 8u; u += WG) {
        let b = u / 8u;
        let c = (u % 8u) / 2u;
        let h = u % 2u;
        let col = 256u * b + 64u * c + 16u * h;  // low nibbles: inputs col..col+15; high: col+32..col+47
        var xl: array<vec4<f32>, 4>;
        var xh: array<vec4<f32>, 4>;
        for (var j = 0u; j < 4u; j++) {
            xl[j] = load_x4(g, 0u, col + 4u * j);
            xh[j] = load_x4(g, 0u, col + 32u + 4u * j);
        }
        let one = vec4<f32>(1.0);
        let sum_l = dot(xl[0] + xl[1] + xl[2] + xl[3], one);
        let sum_h = dot(xh[0] + xh[1] + xh[2] + xh[3], one);
        for (var r = 0u; r < ROWS; r++) {
            let block = g.w_off + (min(row0 + r, g.m - 1u) * nb + b) * Q4K_BLOCK;
            let head = w[block];
            let q = w[block + 1u + 2u * c + h];
            let d = unpack2x16float(head.x);
            let sl = scale_min(head, 2u * c);
            let sh = scale_min(head, 2u * c + 1u);
            var dl = 0.0;
            var dh = 0.0;
            for (var j = 0u; j < 4u; j++) {
                dl += dot(nibbles(q[j], false), xl[j]);
                dh += dot(nibbles(q[j], true), xh[j]);
            }
            acc[r] += d.x * (sl.x * dl + sh.x * dh) - d.y * (sl.y * sum_l + sh.y * sum_h);
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

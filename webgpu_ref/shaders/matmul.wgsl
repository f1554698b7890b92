// Tiled matmul for a chunk of T > 1 tokens (prefill), any weight format (load_w4).
// A 256-invocation workgroup computes a 64 (rows) x 64 (tokens) tile of one group: invocation
// (tx, ty) owns rows tx + 16i and tokens ty + 16j, i, j < 4. Each step over 16 columns stages
// the weights and the token-shifted inputs in workgroup memory, packed so that one vec4 read
// gives an invocation its 4 rows (or tokens): 2 reads per 16 multiply-adds.

const TILE: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> ws: array<array<vec4<f32>, 16>, TK>;  // ws[col][tx][i] = W[row0 + tx + 16i, k0 + col]
var<workgroup> xs: array<array<vec4<f32>, 16>, TK>;  // xs[col][ty][j] = x[t0 + ty + 16j, k0 + col]

@compute @workgroup_size(WG)  // WG = 256
fn main(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let T = step.t;
    let t_blocks = div_ceil(T, TILE);
    let at = locate(flat_id(wid, nwg), TILE, t_blocks);
    if at.x >= p.n_groups {
        return;
    }
    let g = p.groups[at.x];
    let row0 = (at.y / t_blocks) * TILE;
    let t0 = (at.y % t_blocks) * TILE;
    let tx = lane.index % 16u;
    let ty = lane.index / 16u;
    // Loader: invocation i fetches columns lc..lc+3 of tile row (and token) lr.
    let lr = lane.index / 4u;
    let lc = 4u * (lane.index % 4u);
    let w_row = min(row0 + lr, g.m - 1u);  // rows / tokens past the end repeat the last one
    let x_tok = min(t0 + lr, T - 1u);
    var acc: array<vec4<f32>, 4>;  // acc[i][j]: row tx + 16i, token ty + 16j
    for (var k0 = 0u; k0 < g.k; k0 += TK) {
        let wv = load_w4(g.w_off, g.k, w_row, k0 + lc);
        let xv = load_x4(g, x_tok, k0 + lc);
        for (var e = 0u; e < 4u; e++) {
            ws[lc + e][lr % 16u][lr / 16u] = wv[e];
            xs[lc + e][lr % 16u][lr / 16u] = xv[e];
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a = ws[kk][tx];
            let b = xs[kk][ty];
            for (var i = 0u; i < 4u; i++) {
                acc[i] += a[i] * b;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            let row = row0 + tx + 16u * i;
            let t = t0 + ty + 16u * j;
            if row < g.m && t < T {
                store(g, t, row, acc[i][j]);
            }
        }
    }
}

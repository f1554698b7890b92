// Tiled matmul for a chunk of T > 1 tokens (prefill), any weight format (load_w4).
// A 256-invocation workgroup computes a 64 (rows) x 64 (tokens) tile of one group: invocation
// (tx, ty) owns rows tx + 16i and tokens ty + 16j, i, j < 4, in four vec4 accumulators (one
// per row i, its components the tokens j). Each step over TK = 32 columns stages the weights
// and the token-shifted inputs in workgroup memory, packed so that one vec4 read gives an
// invocation its 4 rows (or tokens): 2 reads per 16 multiply-adds. The next step's global
// loads are issued before this step's multiply-adds, so their latency hides behind them.
// Everything per invocation is a named vector, not an array: drivers keep those in registers
// (a dynamically indexed private array can land in slow local memory).

const TILE: u32 = 64u;
const TK: u32 = 32u;

var<workgroup> ws: array<array<vec4<f32>, 16>, TK>;  // ws[col][tx][i] = W[row0 + tx + 16i, k0 + col]
var<workgroup> xs: array<array<vec4<f32>, 16>, TK>;  // xs[col][ty][j] = x[t0 + ty + 16j, k0 + col]

// A loader's 8 columns: weights (w_lo, w_hi) of its row and inputs (x_lo, x_hi) of its token.
struct Stage {
    w_lo: vec4<f32>,
    w_hi: vec4<f32>,
    x_lo: vec4<f32>,
    x_hi: vec4<f32>,
}

// Columns col..col+7 of row `w_row` and token `x_tok`; columns at or past K read as zero.
fn load_stage(g: Group, w_row: u32, x_tok: u32, col: u32) -> Stage {
    var s = Stage(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    if col < g.k {
        s.w_lo = load_w4(g.w_off, g.k, w_row, col);
        s.x_lo = load_x4(g, x_tok, col);
    }
    if col + 4u < g.k {
        s.w_hi = load_w4(g.w_off, g.k, w_row, col + 4u);
        s.x_hi = load_x4(g, x_tok, col + 4u);
    }
    return s;
}

// Writes a loader's stage for row (and token) slot `slot` at columns lc..lc+7 of the tile.
fn put_stage(s: Stage, slot: u32, lc: u32) {
    let a = slot % 16u;
    let b = slot / 16u;
    ws[lc][a][b] = s.w_lo.x;
    ws[lc + 1u][a][b] = s.w_lo.y;
    ws[lc + 2u][a][b] = s.w_lo.z;
    ws[lc + 3u][a][b] = s.w_lo.w;
    ws[lc + 4u][a][b] = s.w_hi.x;
    ws[lc + 5u][a][b] = s.w_hi.y;
    ws[lc + 6u][a][b] = s.w_hi.z;
    ws[lc + 7u][a][b] = s.w_hi.w;
    xs[lc][a][b] = s.x_lo.x;
    xs[lc + 1u][a][b] = s.x_lo.y;
    xs[lc + 2u][a][b] = s.x_lo.z;
    xs[lc + 3u][a][b] = s.x_lo.w;
    xs[lc + 4u][a][b] = s.x_hi.x;
    xs[lc + 5u][a][b] = s.x_hi.y;
    xs[lc + 6u][a][b] = s.x_hi.z;
    xs[lc + 7u][a][b] = s.x_hi.w;
}

// Row `row`, tokens t, t + 16, t + 32, t + 48 (the components of `acc`), where they exist.
fn store_tokens(g: Group, T: u32, row: u32, t: u32, acc: vec4<f32>) {
    if row < g.m {
        if t < T { store(g, t, row, acc.x); }
        if t + 16u < T { store(g, t + 16u, row, acc.y); }
        if t + 32u < T { store(g, t + 32u, row, acc.z); }
        if t + 48u < T { store(g, t + 48u, row, acc.w); }
    }
}

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
    // Loader: invocation i fetches columns lc..lc+7 of tile row (and token) slot. Consecutive
    // invocations take consecutive slots, so their workgroup-memory writes spread over the banks.
    let slot = lane.index % TILE;
    let lc = 8u * (lane.index / TILE);
    let w_row = min(row0 + slot, g.m - 1u);  // rows / tokens past the end repeat the last one
    let x_tok = min(t0 + slot, T - 1u);
    var acc0 = vec4<f32>(0.0);  // row tx, tokens ty + 16j
    var acc1 = vec4<f32>(0.0);  // row tx + 16
    var acc2 = vec4<f32>(0.0);  // row tx + 32
    var acc3 = vec4<f32>(0.0);  // row tx + 48
    var next = load_stage(g, w_row, x_tok, lc);
    for (var k0 = 0u; k0 < g.k; k0 += TK) {
        put_stage(next, slot, lc);
        workgroupBarrier();
        if k0 + TK < g.k {
            next = load_stage(g, w_row, x_tok, k0 + TK + lc);
        }
        for (var kk = 0u; kk < TK; kk++) {
            let a = ws[kk][tx];
            let b = xs[kk][ty];
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
        }
        workgroupBarrier();
    }
    store_tokens(g, T, row0 + tx, t0 + ty, acc0);
    store_tokens(g, T, row0 + tx + 16u, t0 + ty, acc1);
    store_tokens(g, T, row0 + tx + 32u, t0 + ty, acc2);
    store_tokens(g, T, row0 + tx + 48u, t0 + ty, acc3);
}

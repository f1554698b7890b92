// Tiled matmul for a chunk of T > 1 tokens (prefill), any weight format (load_w4).
// A 128-invocation workgroup computes a 64 (rows) x 64 (tokens) tile of one group: invocation
// (tx, ty) owns rows tx + 8i and tokens ty + 16j, i < 8, j < 4, in eight vec4 accumulators (one
// per row i, its components the tokens j). Each step over TK = 16 columns stages the weights
// and the token-shifted inputs in workgroup memory, packed so that one vec4 read gives an
// invocation 4 of its rows (or its 4 tokens): 3 reads per 32 multiply-adds. The next step's
// global loads are issued before this step's multiply-adds, so their latency hides behind them.
// Everything per invocation is a named vector, not an array: drivers keep those in registers
// (a dynamically indexed private array can land in slow local memory).

const TILE_ROWS: u32 = 64u;
const TILE_TOKENS: u32 = 64u;
const TK: u32 = 16u;

// ws[col][h][tx][i] = W[row0 + tx + 8 (4h + i), k0 + col]: h = 0 holds rows tx + 8i, h = 1 the rest
var<workgroup> ws: array<array<array<vec4<f32>, 8>, 2>, TK>;
var<workgroup> xs: array<array<vec4<f32>, 16>, TK>;  // xs[col][ty][j] = x[t0 + ty + 16j, k0 + col]

// A loader's share of one step: 8 weights of its row, 8 inputs of its token.
struct Stage {
    w_lo: vec4<f32>,
    w_hi: vec4<f32>,
    x_lo: vec4<f32>,
    x_hi: vec4<f32>,
}

// Columns k0 + c .. + 7 of row `w_row` and of token `x_tok` (K is a multiple of TK: ops.linear
// checks).
fn load_stage(g: Group, w_row: u32, x_tok: u32, k0: u32, c: u32) -> Stage {
    return Stage(load_w4(g.w_off, g.k, w_row, k0 + c), load_w4(g.w_off, g.k, w_row, k0 + c + 4u),
                 load_x4(g, x_tok, k0 + c), load_x4(g, x_tok, k0 + c + 4u));
}

// Writes columns c..c+7 of tile row (and token) `slot`.
fn put_stage(s: Stage, slot: u32, c: u32) {
    let a = slot % 8u;  // tile row tx + 8 (4h + i)
    let h = slot / 32u;
    let i = (slot / 8u) % 4u;
    ws[c][h][a][i] = s.w_lo.x;
    ws[c + 1u][h][a][i] = s.w_lo.y;
    ws[c + 2u][h][a][i] = s.w_lo.z;
    ws[c + 3u][h][a][i] = s.w_lo.w;
    ws[c + 4u][h][a][i] = s.w_hi.x;
    ws[c + 5u][h][a][i] = s.w_hi.y;
    ws[c + 6u][h][a][i] = s.w_hi.z;
    ws[c + 7u][h][a][i] = s.w_hi.w;
    let xa = slot % 16u;  // tile token xa + 16 xb
    let xb = slot / 16u;
    xs[c][xa][xb] = s.x_lo.x;
    xs[c + 1u][xa][xb] = s.x_lo.y;
    xs[c + 2u][xa][xb] = s.x_lo.z;
    xs[c + 3u][xa][xb] = s.x_lo.w;
    xs[c + 4u][xa][xb] = s.x_hi.x;
    xs[c + 5u][xa][xb] = s.x_hi.y;
    xs[c + 6u][xa][xb] = s.x_hi.z;
    xs[c + 7u][xa][xb] = s.x_hi.w;
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

@compute @workgroup_size(WG)  // WG = 128
fn main(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let T = step.t;
    let t_blocks = div_ceil(T, TILE_TOKENS);
    let at = locate(flat_id(wid, nwg), TILE_ROWS, t_blocks);
    if at.x >= p.n_groups {
        return;
    }
    let g = p.groups[at.x];
    let row0 = (at.y / t_blocks) * TILE_ROWS;
    let t0 = (at.y % t_blocks) * TILE_TOKENS;
    let tx = lane.index % 8u;
    let ty = lane.index / 8u;
    // Loader: invocation i fetches columns c..c+7 of tile row (and token) slot. Consecutive
    // invocations take consecutive slots, so their workgroup-memory writes spread over the banks.
    let slot = lane.index % 64u;
    let c = 8u * (lane.index / 64u);
    let w_row = min(row0 + slot, g.m - 1u);  // rows / tokens past the end repeat the last one
    let x_tok = min(t0 + slot, T - 1u);
    var acc0 = vec4<f32>(0.0);  // row tx, tokens ty + 16j
    var acc1 = vec4<f32>(0.0);  // row tx + 8
    var acc2 = vec4<f32>(0.0);  // row tx + 16
    var acc3 = vec4<f32>(0.0);  // row tx + 24
    var acc4 = vec4<f32>(0.0);  // row tx + 32
    var acc5 = vec4<f32>(0.0);  // row tx + 40
    var acc6 = vec4<f32>(0.0);  // row tx + 48
    var acc7 = vec4<f32>(0.0);  // row tx + 56
    var next = load_stage(g, w_row, x_tok, 0u, c);
    for (var k0 = 0u; k0 < g.k; k0 += TK) {
        put_stage(next, slot, c);
        workgroupBarrier();
        if k0 + TK < g.k {
            next = load_stage(g, w_row, x_tok, k0 + TK, c);
        }
        for (var kk = 0u; kk < TK; kk++) {
            let a = ws[kk][0][tx];
            let e = ws[kk][1][tx];
            let b = xs[kk][ty];
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
            acc4 += e.x * b;
            acc5 += e.y * b;
            acc6 += e.z * b;
            acc7 += e.w * b;
        }
        workgroupBarrier();
    }
    store_tokens(g, T, row0 + tx, t0 + ty, acc0);
    store_tokens(g, T, row0 + tx + 8u, t0 + ty, acc1);
    store_tokens(g, T, row0 + tx + 16u, t0 + ty, acc2);
    store_tokens(g, T, row0 + tx + 24u, t0 + ty, acc3);
    store_tokens(g, T, row0 + tx + 32u, t0 + ty, acc4);
    store_tokens(g, T, row0 + tx + 40u, t0 + ty, acc5);
    store_tokens(g, T, row0 + tx + 48u, t0 + ty, acc6);
    store_tokens(g, T, row0 + tx + 56u, t0 + ty, acc7);
}

// Linear ops: out[t, row] = act(W[row, :] . x_t) for up to 8 groups, each with its own matrix,
// input, mixing vector and output, so one dispatch computes e.g. r, k, v and the four LoRA
// down-projections of a layer. Groups are laid out back to back in the grid: workgroup b
// belongs to the first group whose blocks it has not yet passed.
//
// The token shift is fused into the input load. A group with a mixing vector mu reads
// x_t = cur + (prev - cur) * mu, cur = input row t and prev = row t - 1: the layer-norm op
// writes (T + 1, C) rows whose row 0 is the previous chunk's last token.

struct Group {
    w_off: u32,  // first W4 of this group's (M, K) matrix in `w`
    k: u32,  // K, a multiple of 8 (16 for the tiled matmul)
    m: u32,  // M
    in_off: u32,  // first float of input row 0 (row t at in_off + t * K)
    mu_off: u32,  // first float of mu in `vecs`, or NO_MIX
    out_off: u32,  // first float of output row 0
    out_stride: u32,  // floats between output rows (M, or the full width of a split matrix)
    act: u32,  // ACT_*
}

struct LinearParams {
    n_groups: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
    groups: array<Group, 8>,
}

@group(0) @binding(0) var<uniform> p: LinearParams;  // the groups of this op
@group(0) @binding(1) var<uniform> step: Step;  // T
@group(0) @binding(2) var<storage, read> w: array<W4>;  // groups' matrices, (M, K) row-major each
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;  // inputs, (T [+ 1], K) per group
@group(0) @binding(4) var<storage, read> vecs: array<vec4<f32>>;  // mixing vectors mu, (K)
@group(0) @binding(5) var<storage, read_write> out: array<f32>;  // (T, out_stride) per group

// (group, block within the group) of flat workgroup `b`; group n_groups when past the end.
// Group g spans ceil(M / rows_per_block) * t_blocks blocks.
fn locate(b: u32, rows_per_block: u32, t_blocks: u32) -> vec2<u32> {
    var rest = b;
    for (var g = 0u; g < p.n_groups; g++) {
        let n = div_ceil(p.groups[g].m, rows_per_block) * t_blocks;
        if rest < n {
            return vec2<u32>(g, rest);
        }
        rest -= n;
    }
    return vec2<u32>(p.n_groups, 0u);
}

// First W4 of rows row0 + 4 * quad + (0, 1, 2, 3) with `stride` W4 per row (the mat-vecs' rows
// in fours); rows past M repeat the last one (their sums are not stored).
fn row_bases(g: Group, row0: u32, quad: u32, stride: u32) -> vec4<u32> {
    let rows = min(vec4<u32>(row0 + 4u * quad) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(g.m - 1u));
    return g.w_off + rows * stride;
}

// The mat-vecs' epilogue: sums the workgroup's partial dots of rows row0 .. row0 + 3 (acc0) and
// row0 + 4 .. row0 + 7 (acc1); invocation i < 8 stores row row0 + i. Every invocation calls it.
fn store_rows8(g: Group, row0: u32, acc0: vec4<f32>, acc1: vec4<f32>, lane: Lane) {
    let total0 = sum4(acc0, lane);
    let total1 = sum4(acc1, lane);
    if lane.index < 8u && row0 + lane.index < g.m {
        let total = select(total1, total0, lane.index < 4u);
        store(g, 0u, row0 + lane.index, total[lane.index % 4u]);
    }
}

// Inputs col..col+3 (col % 4 == 0) of token t, token-shifted when the group has a mu.
fn load_x4(g: Group, t: u32, col: u32) -> vec4<f32> {
    let i = g.in_off + t * g.k + col;
    let cur = x[i / 4u];
    if g.mu_off == NO_MIX {
        return cur;
    }
    return cur + (x[(i - g.k) / 4u] - cur) * vecs[(g.mu_off + col) / 4u];
}

fn store(g: Group, t: u32, row: u32, y: f32) {
    let i = g.out_off + t * g.out_stride + row;
    switch g.act {
        case ACT_TANH: { out[i] = tanh_safe(y); }
        case ACT_SIGMOID: { out[i] = sigmoid(y); }
        case ACT_RELU_SQ: { let r = max(y, 0.0); out[i] = r * r; }
        case ACT_ADD: { out[i] += y; }
        default: { out[i] = y; }
    }
}

// Mat-vec for one token on Q4_K weights with int8 activations (the "int8" form of
// ops.Q4KMatvec; llama.cpp's Q8_1 approach). A workgroup computes ROWS consecutive rows of one
// group and walks K in tiles of 32 WG columns:
//   1. invocation i quantizes the 32 token-shifted inputs x of tile columns 32i .. 32i + 31 to
//      int8, xq = round(x * 127 / max|x|), into workgroup memory with their scale
//      max|x| / 127 and the exact float sums of each 16 columns;
//   2. invocation i takes nibble word i % 8 (16 columns of one sub-block in the low nibbles,
//      16 of the next in the high ones, as in matvec_q4k.wgsl) of super-block i / 8 of the tile
//      in every row: dot4I8Packed multiplies 4 nibbles by 4 int8 inputs at once, so a weight
//      costs about a quarter of an instruction.
// Per sub-block the weight is d*sc*q - dmin*m, so its share of the dot is
//   d*sc*scale * (q . xq) - dmin*m * sum(x),
// exact but for the int8 rounding of x (relative error up to 1/254 per input).

var<workgroup> xq: array<u32, 8u * WG>;  // the tile's int8 inputs, 4 per word, in column order
var<workgroup> x_scale: array<f32, WG>;  // per 32 columns
var<workgroup> x_sum: array<f32, 2u * WG>;  // exact float sums per 16 columns

const NIBBLES: u32 = 0x0f0f0f0fu;

// Quantizes tile columns 32 i .. 32 i + 31 (i = this invocation) of the group's input, from
// column k0; columns past K are zeros.
fn quantize_inputs(g: Group, k0: u32, i: u32) {
    let col = k0 + 32u * i;
    var v = array<vec4<f32>, 8>();
    if col < g.k {
        v = array<vec4<f32>, 8>(load_x4(g, 0u, col), load_x4(g, 0u, col + 4u), load_x4(g, 0u, col + 8u),
                                load_x4(g, 0u, col + 12u), load_x4(g, 0u, col + 16u), load_x4(g, 0u, col + 20u),
                                load_x4(g, 0u, col + 24u), load_x4(g, 0u, col + 28u));
    }
    let m = max(max(max(abs(v[0]), abs(v[1])), max(abs(v[2]), abs(v[3]))),
                max(max(abs(v[4]), abs(v[5])), max(abs(v[6]), abs(v[7]))));
    let amax = max(max(m.x, m.y), max(m.z, m.w));
    let inv = select(0.0, 127.0 / amax, amax > 0.0);
    for (var e = 0u; e < 8u; e++) {
        xq[8u * i + e] = pack4xI8(vec4<i32>(round(v[e] * inv)));
    }
    x_scale[i] = amax / 127.0;
    let one = vec4<f32>(1.0);
    x_sum[2u * i] = dot(v[0] + v[1] + v[2] + v[3], one);
    x_sum[2u * i + 1u] = dot(v[4] + v[5] + v[6] + v[7], one);
}

// This invocation's share of one row in one super-block: nibble word `q` of the block with
// header `head`; its inputs start at word `xw` of xq (low nibbles; high ones 8 words later)
// and at 16-column group `s` (high: s + 2).
fn q4k_dot_i8(head: W4, q: W4, xw: u32, s: u32, sh: ScaleShifts) -> f32 {
    let lo = dot4I8Packed(q.x & NIBBLES, xq[xw]) + dot4I8Packed(q.y & NIBBLES, xq[xw + 1u])
           + dot4I8Packed(q.z & NIBBLES, xq[xw + 2u]) + dot4I8Packed(q.w & NIBBLES, xq[xw + 3u]);
    let hi = dot4I8Packed((q.x >> 4u) & NIBBLES, xq[xw + 8u]) + dot4I8Packed((q.y >> 4u) & NIBBLES, xq[xw + 9u])
           + dot4I8Packed((q.z >> 4u) & NIBBLES, xq[xw + 10u]) + dot4I8Packed((q.w >> 4u) & NIBBLES, xq[xw + 11u]);
    let d = unpack2x16float(head.x);
    // (sc_lo, sc_hi, m_lo, m_hi); 0x4b000000 = 2^23: a 6-bit value v in its mantissa reads 2^23 + v
    let sm = bitcast<vec4<f32>>(scale_bits(head, sh) | vec4<u32>(0x4b000000u)) - 8388608.0;
    let scales = vec2<f32>(x_scale[s / 2u], x_scale[s / 2u + 1u]);
    let sums = vec2<f32>(x_sum[s], x_sum[s + 2u]);
    return d.x * dot(sm.xy * scales, vec2<f32>(f32(lo), f32(hi))) - d.y * dot(sm.zw, sums);
}

// q4k_dot_i8 for 4 rows whose super-blocks start at W4 `blocks`.
fn q4k_dot4_i8(blocks: vec4<u32>, word: u32, xw: u32, s: u32, sh: ScaleShifts) -> vec4<f32> {
    let q = blocks + 1u + word;
    return vec4<f32>(q4k_dot_i8(w[blocks.x], w[q.x], xw, s, sh), q4k_dot_i8(w[blocks.y], w[q.y], xw, s, sh),
                     q4k_dot_i8(w[blocks.z], w[q.z], xw, s, sh), q4k_dot_i8(w[blocks.w], w[q.w], xw, s, sh));
}

@compute @workgroup_size(WG)
fn main(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let at = locate(flat_id(wid, nwg), ROWS, 1u);
    if at.x >= p.n_groups {
        return;  // a whole workgroup: its barriers stay uniform
    }
    let g = p.groups[at.x];
    let row0 = at.y * ROWS;
    let stride = (g.k / 256u) * Q4K_BLOCK;  // W4 per row
    let r0 = row_bases(g, row0, 0u, stride);
    let r1 = row_bases(g, row0, 1u, stride);
    let r2 = row_bases(g, row0, 2u, stride);
    let r3 = row_bases(g, row0, 3u, stride);
    let word = lane.index % 8u;  // nibble word (W4 1 + word) of each super-block
    let sh = scale_shifts(word / 2u);
    let col = 256u * (lane.index / 8u) + 64u * (word / 2u) + 16u * (word % 2u);  // first column, in the tile
    var acc0 = vec4<f32>(0.0);  // rows row0 .. row0 + 3
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);  // ROWS = 16 only
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < g.k; k0 += 32u * WG) {
        quantize_inputs(g, k0, lane.index);
        workgroupBarrier();
        let b = k0 / 256u + lane.index / 8u;  // this invocation's super-block
        if b < g.k / 256u {
            let o = b * Q4K_BLOCK;
            acc0 += q4k_dot4_i8(r0 + o, word, col / 4u, col / 16u, sh);
            acc1 += q4k_dot4_i8(r1 + o, word, col / 4u, col / 16u, sh);
            if ROWS == 16u {
                acc2 += q4k_dot4_i8(r2 + o, word, col / 4u, col / 16u, sh);
                acc3 += q4k_dot4_i8(r3 + o, word, col / 4u, col / 16u, sh);
            }
        }
        workgroupBarrier();
    }
    store_rows8(g, row0, acc0, acc1, lane);
    if ROWS == 16u {
        store_rows8(g, row0 + 8u, acc2, acc3, lane);
    }
}

// Mat-vec for one token (decode) on Q4_K weights. A workgroup computes ROWS consecutive rows of
// one group. The host (ops.Q4KMatvec) picks the form through three constants:
//   SHARES  nibble words (16 bytes, 32 weights) an invocation takes of each super-block and row:
//           1: 8 invocations share a super-block; 2: 4 do, each a whole 32-byte qs chunk, so
//           one header load and one set of scales serve 64 weights, and twice the bytes are in
//           flight per invocation
//   DECODE  DECODE_BITS: each nibble q becomes the f32 f = 1 + q/16 by itself (nibble_floats,
//           3 integer ops a weight); DECODE_F16_PAIRS: two nibbles become the f16 pair
//           (1 + q/16, 1 + q'/16) in one u32 (3 integer ops a pair, then unpack2x16float), and
//           the 6-bit scales become floats without an int-to-float conversion (slow on NVIDIA)
//   ROWS    8 or 16, in 2 or 4 vec4 accumulators
// Invocation part p = index % PARTS takes the same nibble words of every super-block it visits:
// words i = SHARES * p .. SHARES * p + SHARES - 1 (W4 1 + i of the block). Word i lies in qs
// chunk c = i / 2, half h = i % 2: the low nibbles of sub-block 2c (columns 64c + 16h + 0..15)
// and the high nibbles of sub-block 2c + 1 (the same + 32); the words of one invocation share a
// chunk. So its scale shifts are set once, and nothing is indexed at run time. Each step loads
// the header and nibble words of all rows, then the inputs (once for all rows), then computes.
// Per sub-block the min term factors out: sum (d*sc*q - dmin*m) x = d*sc*(q . x) - dmin*m*sum(x).

const DECODE_BITS: u32 = 0u;
const DECODE_F16_PAIRS: u32 = 1u;
const PARTS: u32 = 8u / SHARES;  // invocations per super-block

// The 32 inputs under one nibble word.
struct Share {
    lo: array<vec4<f32>, 4>,  // under the low nibbles of its u32s 0..3
    hi: array<vec4<f32>, 4>,  // under the high nibbles
}

fn load_share(g: Group, col: u32) -> Share {
    return Share(array<vec4<f32>, 4>(load_x4(g, 0u, col), load_x4(g, 0u, col + 4u),
                                     load_x4(g, 0u, col + 8u), load_x4(g, 0u, col + 12u)),
                 array<vec4<f32>, 4>(load_x4(g, 0u, col + 32u), load_x4(g, 0u, col + 36u),
                                     load_x4(g, 0u, col + 40u), load_x4(g, 0u, col + 44u)));
}

fn share_sums(x: Share) -> vec2<f32> {
    let one = vec4<f32>(1.0);
    return vec2<f32>(dot(x.lo[0] + x.lo[1] + x.lo[2] + x.lo[3], one), dot(x.hi[0] + x.hi[1] + x.hi[2] + x.hi[3], one));
}

// This invocation's inputs in one super-block.
struct Inputs {
    a: Share,  // under its first nibble word
    b: Share,  // under its second (SHARES = 2; a copy of `a`, unused, otherwise)
    sums: vec2<f32>,  // (sum lo, sum hi) over its shares
}

fn load_inputs(g: Group, col: u32) -> Inputs {
    let a = load_share(g, col);
    if SHARES == 1u {
        return Inputs(a, a, share_sums(a));
    }
    let b = load_share(g, col + 16u);  // word i + 1: half 1 of the same chunk
    return Inputs(a, b, share_sums(a) + share_sums(b));
}

// Header and this invocation's nibble words of 4 rows in one super-block.
struct Words4 {
    head: array<W4, 4>,
    a: array<W4, 4>,  // its first nibble word
    b: array<W4, 4>,  // its second (SHARES = 2; a copy of `a`, unused, otherwise)
}

// `blocks`: the rows' super-blocks (W4 index); `word`: this invocation's first nibble word.
fn load_words4(blocks: vec4<u32>, word: u32) -> Words4 {
    let q = blocks + 1u + word;
    let head = array<W4, 4>(w[blocks.x], w[blocks.y], w[blocks.z], w[blocks.w]);
    let a = array<W4, 4>(w[q.x], w[q.y], w[q.z], w[q.w]);
    if SHARES == 1u {
        return Words4(head, a, a);
    }
    return Words4(head, a, array<W4, 4>(w[q.x + 1u], w[q.y + 1u], w[q.z + 1u], w[q.w + 1u]));
}

// sum f x over the 16 low (or high) nibbles of `q` (f = 1 + q/16, nibble_floats).
fn nibble_dot(q: W4, x: array<vec4<f32>, 4>, left: vec4<u32>, right: vec4<u32>) -> f32 {
    return dot(nibble_floats(q.x, left, right), x[0]) + dot(nibble_floats(q.y, left, right), x[1])
         + dot(nibble_floats(q.z, left, right), x[2]) + dot(nibble_floats(q.w, left, right), x[3]);
}

// Shifts that take nibbles n and n + 4 of a u32 (bits 4n.. and 4n + 16..), n = 0..3, to bits
// 6..9 of its two halves: the top mantissa bits of the f16 1.0 (0x3c00).
const PAIR_LEFT = vec4<u32>(6u, 2u, 0u, 0u);
const PAIR_RIGHT = vec4<u32>(0u, 0u, 2u, 6u);

// (sum f x over the low nibbles of the 4 bytes of `v`, the same over the high) with f = 1 + q/16
// as f16 pairs: pair n holds nibbles n, n + 4, i.e. (low, high, low, high) of bytes (0 and 2,
// 0 and 2, 1 and 3, 1 and 3), so the floats come in byte order 0, 2, 1, 3.
fn pair_dots(v: u32, lo: vec4<f32>, hi: vec4<f32>) -> vec2<f32> {
    let h = (((vec4<u32>(v) << PAIR_LEFT) >> PAIR_RIGHT) & vec4<u32>(0x03c003c0u)) | vec4<u32>(0x3c003c00u);
    let f_lo = vec4<f32>(unpack2x16float(h.x), unpack2x16float(h.z));
    let f_hi = vec4<f32>(unpack2x16float(h.y), unpack2x16float(h.w));
    return vec2<f32>(dot(f_lo, lo.xzyw), dot(f_hi, hi.xzyw));
}

// (sum f x over the low nibbles of `q`, the same over the high) for its inputs `x`.
fn nibble_dots(q: W4, x: Share) -> vec2<f32> {
    if DECODE == DECODE_F16_PAIRS {
        return pair_dots(q.x, x.lo[0], x.hi[0]) + pair_dots(q.y, x.lo[1], x.hi[1])
             + pair_dots(q.z, x.lo[2], x.hi[2]) + pair_dots(q.w, x.lo[3], x.hi[3]);
    }
    return vec2<f32>(nibble_dot(q, x.lo, LOW_LEFT, LOW_RIGHT), nibble_dot(q, x.hi, HIGH_LEFT, HIGH_RIGHT));
}

// (sc_lo, sc_hi, m_lo, m_hi) of this invocation's sub-blocks as floats.
fn scale_floats(head: W4, sh: ScaleShifts) -> vec4<f32> {
    if DECODE == DECODE_F16_PAIRS {
        // 0x4b000000 = 2^23: a 6-bit value v in its mantissa reads 2^23 + v, exactly
        return bitcast<vec4<f32>>(scale_bits(head, sh) | vec4<u32>(0x4b000000u)) - 8388608.0;
    }
    return scales_mins(head, sh);
}

// This invocation's share of one row.
fn q4k_dot(head: W4, a: W4, b: W4, x: Inputs, sh: ScaleShifts) -> f32 {
    var fx = nibble_dots(a, x.a);
    if SHARES == 2u {
        fx += nibble_dots(b, x.b);
    }
    let d = unpack2x16float(head.x);
    let sm = scale_floats(head, sh);  // (sc_lo, sc_hi, m_lo, m_hi)
    return 16.0 * d.x * dot(sm.xy, fx - x.sums) - d.y * dot(sm.zw, x.sums);
}

// q4k_dot for 4 rows.
fn q4k_dot4(rows: Words4, x: Inputs, sh: ScaleShifts) -> vec4<f32> {
    return vec4<f32>(q4k_dot(rows.head[0], rows.a[0], rows.b[0], x, sh),
                     q4k_dot(rows.head[1], rows.a[1], rows.b[1], x, sh),
                     q4k_dot(rows.head[2], rows.a[2], rows.b[2], x, sh),
                     q4k_dot(rows.head[3], rows.a[3], rows.b[3], x, sh));
}

@compute @workgroup_size(WG)
fn main(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let at = locate(flat_id(wid, nwg), ROWS, 1u);
    if at.x >= p.n_groups {
        return;
    }
    let g = p.groups[at.x];
    let row0 = at.y * ROWS;
    let nb = g.k / 256u;  // super-blocks per row
    let stride = nb * Q4K_BLOCK;  // W4 per row
    // Rows row0 + 4j .. row0 + 4j + 3 in r[j] and acc[j], j < ROWS / 4.
    let r = array<vec4<u32>, 4>(row_bases(g, row0, 0u, stride), row_bases(g, row0, 1u, stride),
                                row_bases(g, row0, 2u, stride), row_bases(g, row0, 3u, stride));
    let word = SHARES * (lane.index % PARTS);  // first nibble word (0..7) of each super-block
    let sh = scale_shifts(word / 2u);
    let col = 64u * (word / 2u) + 16u * (word % 2u);  // first input column in each super-block
    var acc = array<vec4<f32>, 4>();
    for (var b = lane.index / PARTS; b < nb; b += WG / PARTS) {
        let o = b * Q4K_BLOCK;
        var rows: array<Words4, 4>;
        rows[0] = load_words4(r[0] + o, word);
        rows[1] = load_words4(r[1] + o, word);
        if ROWS == 16u {
            rows[2] = load_words4(r[2] + o, word);
            rows[3] = load_words4(r[3] + o, word);
        }
        let x = load_inputs(g, 256u * b + col);
        acc[0] += q4k_dot4(rows[0], x, sh);
        acc[1] += q4k_dot4(rows[1], x, sh);
        if ROWS == 16u {
            acc[2] += q4k_dot4(rows[2], x, sh);
            acc[3] += q4k_dot4(rows[3], x, sh);
        }
    }
    store_rows8(g, row0, acc[0], acc[1], lane);
    if ROWS == 16u {
        store_rows8(g, row0 + 8u, acc[2], acc[3], lane);
    }
}

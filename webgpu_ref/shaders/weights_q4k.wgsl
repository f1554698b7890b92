// GGUF Q4_K weights: a super-block of 256 weights is 144 bytes = 9 vec4<u32>:
// [0] = (d, dmin as two f16) + scales[12]; [1..8] = qs[128]. Sub-block j (32 weights) has a
// 6-bit scale sc_j and min m_j; weight = d*sc_j*q - dmin*m_j. qs chunk c (32 bytes) holds
// sub-block 2c in its low nibbles and 2c+1 in its high nibbles.
alias W4 = vec4<u32>;

const Q4K_BLOCK: u32 = 9u;  // vec4<u32> per super-block

// The scales of chunk c's sub-blocks 2c, 2c + 1 in the words s0, s1, s2 = head.y, head.z, head.w
// (scales bytes 0-3, 4-7, 8-11), as llama.cpp's get_scale_min_k4 reads them:
//   j < 4:  sc_j = s0.byte[j] & 63,  m_j = s1.byte[j] & 63
//   j >= 4: sc_j = (s2.byte[j-4] & 15) | (s0.byte[j-4] >> 6) << 4,
//           m_j = (s2.byte[j-4] >> 4) | (s1.byte[j-4] >> 6) << 4
// 2c and 2c + 1 use bytes 2(c % 2) and 2(c % 2) + 1 of their words, so both cases read
// ((s >> a) & mask_a) | ((s2 >> b) & mask_b), s = s0 for sc and s1 for m, with shifts and
// masks that depend on c only.
struct ScaleShifts {
    a: vec4<u32>,  // for (sc_2c, sc_2c+1, m_2c, m_2c+1) from (s0, s0, s1, s1)
    b: vec4<u32>,  // the same from s2
    mask_a: u32,
    mask_b: u32,
}

fn scale_shifts(c: u32) -> ScaleShifts {
    let byte = vec4<u32>(16u * (c % 2u));
    let high = c >= 2u;  // sub-blocks 4..7
    return ScaleShifts(byte + vec4<u32>(0u, 8u, 0u, 8u) + select(0u, 2u, high), byte + vec4<u32>(0u, 8u, 4u, 12u),
                       select(63u, 0x30u, high), select(0u, 15u, high));
}

// (sc_2c, sc_2c+1, m_2c, m_2c+1) of the super-block with header `head`, for sh = scale_shifts(c).
fn scale_bits(head: W4, sh: ScaleShifts) -> vec4<u32> {
    let a = (vec4<u32>(head.yy, head.zz) >> sh.a) & vec4<u32>(sh.mask_a);
    let b = (vec4<u32>(head.w) >> sh.b) & vec4<u32>(sh.mask_b);
    return a | b;
}

fn scales_mins(head: W4, sh: ScaleShifts) -> vec4<f32> {
    return vec4<f32>(scale_bits(head, sh));
}

// Shifts that take the nibble of byte e (low: bits 8e..8e+3, high: 8e+4..8e+7) to bits 19..22.
const LOW_LEFT = vec4<u32>(19u, 11u, 3u, 0u);
const LOW_RIGHT = vec4<u32>(0u, 0u, 0u, 5u);
const HIGH_LEFT = vec4<u32>(15u, 7u, 0u, 0u);
const HIGH_RIGHT = vec4<u32>(0u, 0u, 1u, 9u);

// The low (or high) nibbles q of the 4 bytes of `v` as the floats f = 1 + q/16: in the top
// mantissa bits of 1.0 they need no conversion, 2 integer ops each; sum q x = 16 (sum f x - sum x).
fn nibble_floats(v: u32, left: vec4<u32>, right: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>((((vec4<u32>(v) << left) >> right) & vec4<u32>(0x00780000u)) | vec4<u32>(0x3f800000u));
}

// 4 weights of `row`, columns col..col+3 (col % 4 == 0), of the (M, K) matrix at W4 `w_off`.
fn load_w4(w_off: u32, k: u32, row: u32, col: u32) -> vec4<f32> {
    let block = w_off + (row * (k / 256u) + col / 256u) * Q4K_BLOCK;
    let j = (col % 256u) / 32u;  // sub-block; its nibbles sit in chunk j / 2
    let high = j % 2u == 1u;
    let l = col % 32u;
    let head = w[block];
    let d = unpack2x16float(head.x);
    let sm = scales_mins(head, scale_shifts(j / 2u));
    let q = w[block + 1u + (j / 2u) * 2u + l / 16u][(l % 16u) / 4u];
    let f = nibble_floats(q, select(LOW_LEFT, HIGH_LEFT, high), select(LOW_RIGHT, HIGH_RIGHT, high));
    return 16.0 * d.x * select(sm.x, sm.y, high) * (f - 1.0) - d.y * select(sm.z, sm.w, high);
}

// GGUF Q4_K weights: a super-block of 256 weights is 144 bytes = 9 vec4<u32>:
// [0] = (d, dmin as two f16) + scales[12]; [1..8] = qs[128]. Sub-block j (32 weights) has a
// 6-bit scale sc_j and min m_j; weight = d*sc_j*q - dmin*m_j. qs chunk c (32 bytes) holds
// sub-block 2c in its low nibbles and 2c+1 in its high nibbles.
alias W4 = vec4<u32>;

const Q4K_BLOCK: u32 = 9u;  // vec4<u32> per super-block

fn scale_byte(head: vec4<u32>, i: u32) -> u32 {
    return (head[1u + i / 4u] >> (8u * (i % 4u))) & 0xffu;
}

// (sc_j, m_j) of sub-block j, unpacked from the 12 scale bytes as llama.cpp's get_scale_min_k4.
fn scale_min(head: vec4<u32>, j: u32) -> vec2<f32> {
    if j < 4u {
        return vec2<f32>(f32(scale_byte(head, j) & 63u), f32(scale_byte(head, j + 4u) & 63u));
    }
    let lo = scale_byte(head, j + 4u);
    let sc = (lo & 0xfu) | ((scale_byte(head, j - 4u) >> 6u) << 4u);
    let m = (lo >> 4u) | ((scale_byte(head, j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

// The four nibbles of the bytes of `q`, low (high = false) or high (high = true), as floats.
fn nibbles(q: u32, high: bool) -> vec4<f32> {
    return vec4<f32>(unpack4xU8((q >> select(0u, 4u, high)) & 0x0f0f0f0fu));
}

// 4 weights of `row`, columns col..col+3 (col % 4 == 0), of the (M, K) matrix at W4 `w_off`.
fn load_w4(w_off: u32, k: u32, row: u32, col: u32) -> vec4<f32> {
    let block = w_off + (row * (k / 256u) + col / 256u) * Q4K_BLOCK;
    let j = (col % 256u) / 32u;  // sub-block; its nibbles sit in chunk j / 2
    let l = col % 32u;
    let head = w[block];
    let d = unpack2x16float(head.x);
    let sm = scale_min(head, j);
    let q = w[block + 1u + (j / 2u) * 2u + l / 16u][(l % 16u) / 4u];
    return d.x * sm.x * nibbles(q, j % 2u == 1u) - d.y * sm.y;
}

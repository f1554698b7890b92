// f16 weights read natively (shader-f16), accumulated in f32.
alias W4 = vec4<f16>;

fn w4(v: W4) -> vec4<f32> {
    return vec4<f32>(v);
}

// 4 weights of `row`, columns col..col+3 (col % 4 == 0), of the (M, K) matrix at W4 `w_off`.
fn load_w4(w_off: u32, k: u32, row: u32, col: u32) -> vec4<f32> {
    return w4(w[w_off + (row * k + col) / 4u]);
}

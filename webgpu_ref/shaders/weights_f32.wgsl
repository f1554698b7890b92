// f32 weights (the f32-equivalent configuration used to test the kernels against the oracle).
alias W4 = vec4<f32>;

fn w4(v: W4) -> vec4<f32> {
    return v;
}

// 4 weights of `row`, columns col..col+3 (col % 4 == 0), of the (M, K) matrix at W4 `w_off`.
fn load_w4(w_off: u32, k: u32, row: u32, col: u32) -> vec4<f32> {
    return w4(w[w_off + (row * k + col) / 4u]);
}

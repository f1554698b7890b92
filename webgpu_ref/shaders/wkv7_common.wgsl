// WKV-7 time mix (shared by wkv7.wgsl, one token at a time, and wkv7_chunk.wgsl, a chunk in
// three passes). Per token, for channel c of head h (state S[value, key] of N x N per head):
//   decay w = exp(-e^-0.5 * sigmoid(w0 + w_lora)), a = sigmoid(a0 + a_lora)
//   kk = L2-normalised k * k_k; k' = k * (1 + (a - 1) * k_a)
//   layer 0: v_first = v; else v' = v + (v_first - v) * sigmoid(v0 + v_lora)
//   S = S diag(w) + (S (-kk)) (kk * a)^T + v' k'^T;  y = S r
//   y = GroupNorm(y) * ln_x.weight + ln_x.bias + (sum_head r * k' * r_k) * v';  out = y * g
// Inputs: `proj` (3, t_max, C) holds r, k, v; `mix` (4, t_max, C) the w, a, v LoRA outputs and
// the gate g (MIX_REGION in model.py).

struct WkvParams {
    c: u32,  // C
    t_max: u32,  // rows per region of `proj` and `mix`
    state: u32,  // first float of this layer's S (H, N, N) in `state`
    layer0: u32,  // 1 on layer 0: store v_first instead of mixing with it
    w0: u32,  // offsets of the per-layer vectors (C) in `vecs`
    a0: u32,
    v0: u32,
    k_k: u32,
    k_a: u32,
    r_k: u32,
    ln_w: u32,
    ln_b: u32,
}

const DECAY_SCALE: f32 = 0.606531;  // exp(-0.5), as in the official code
const GN_EPS: f32 = 64e-5;  // ln_x GroupNorm eps
const L2_EPS: f32 = 1e-12;  // F.normalize eps

// The whole time-mix core of one layer after the projections, one workgroup of N invocations
// per head; invocation i owns row i of the head's state S[value, key] (N fp32 in registers).
// Per token, in order:
//   decay w = exp(-e^-0.5 * sigmoid(w0 + w_lora)), a = sigmoid(a0 + a_lora)
//   kk = L2-normalised k * k_k; k' = k * (1 + (a - 1) * k_a)
//   layer 0: v_first = v; else v' = v + (v_first - v) * sigmoid(v0 + v_lora)
//   S = S diag(w) + (S (-kk)) (kk * a)^T + v' k'^T;  y = S r
//   y = GroupNorm(y) * ln_x.weight + ln_x.bias + (sum_head r * k' * r_k) * v';  out = y * g
// State enters and leaves through `state`; between tokens it stays in registers.

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

@group(0) @binding(0) var<uniform> p: WkvParams;  // this layer's offsets
@group(0) @binding(1) var<uniform> step: Step;  // T
@group(0) @binding(2) var<storage, read> proj: array<f32>;  // (3, t_max, C): r, k, v (+ LoRA regions after)
@group(0) @binding(3) var<storage, read> mix: array<f32>;  // (4, t_max, C): w, a, v LoRA outputs and gate g
@group(0) @binding(4) var<storage, read> vecs: array<f32>;  // per-layer vectors (C) at the offsets above
@group(0) @binding(5) var<storage, read_write> v_first: array<f32>;  // (t_max, C)
@group(0) @binding(6) var<storage, read_write> state: array<f32>;  // S (H, N, N) fp32
@group(0) @binding(7) var<storage, read_write> y: array<f32>;  // (T, C)

const DECAY_SCALE: f32 = 0.606531;  // exp(-0.5), as in the official code
const GN_EPS: f32 = 64e-5;  // ln_x GroupNorm eps
const L2_EPS: f32 = 1e-12;  // F.normalize eps

var<workgroup> sr: array<f32, N>;  // r
var<workgroup> sw: array<f32, N>;  // decay
var<workgroup> sk: array<f32, N>;  // k'
var<workgroup> sa: array<f32, N>;  // -kk
var<workgroup> sb: array<f32, N>;  // kk * a

// One token's inputs to invocation i (channel c).
struct TokenIn {
    r: f32,
    k: f32,
    v: f32,
    w_lora: f32,
    a_lora: f32,
    v_lora: f32,
    g: f32,
    v_first: f32,  // read on layers > 0
}

fn load_token(t: u32, c: u32) -> TokenIn {
    let o = t * p.c + c;
    let region = p.t_max * p.c;
    return TokenIn(proj[o], proj[region + o], proj[2u * region + o], mix[o], mix[region + o],
                   mix[2u * region + o], mix[3u * region + o], v_first[o]);
}

@compute @workgroup_size(WG)  // WG = N
fn main(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = lane.index;
    let c = wid.x * N + i;
    let s_row = p.state + c * N;
    var s: array<f32, N>;
    for (var j = 0u; j < N; j++) {
        s[j] = state[s_row + j];
    }
    let w0 = vecs[p.w0 + c];
    let a0 = vecs[p.a0 + c];
    let v0 = vecs[p.v0 + c];
    let k_k = vecs[p.k_k + c];
    let k_a = vecs[p.k_a + c];
    let r_k = vecs[p.r_k + c];
    let ln_w = vecs[p.ln_w + c];
    let ln_b = vecs[p.ln_b + c];
    var cur = load_token(0u, c);
    for (var t = 0u; t < step.t; t++) {
        // Prefetch the next token: its load latency hides behind this token's work.
        let next = load_token(min(t + 1u, step.t - 1u), c);
        let decay = exp(-DECAY_SCALE * sigmoid(w0 + cur.w_lora));
        let a = sigmoid(a0 + cur.a_lora);
        let kk = cur.k * k_k;
        let k2 = cur.k * (1.0 + (a - 1.0) * k_a);
        var v = cur.v;
        if p.layer0 == 1u {
            v_first[t * p.c + c] = v;
        } else {
            v += (cur.v_first - v) * sigmoid(v0 + cur.v_lora);
        }
        let sums = sum4(vec4<f32>(kk * kk, cur.r * k2 * r_k, 0.0, 0.0), lane);
        let kk_n = kk / max(sqrt(sums.x), L2_EPS);
        sr[i] = cur.r;
        sw[i] = decay;
        sk[i] = k2;
        sa[i] = -kk_n;
        sb[i] = kk_n * a;
        workgroupBarrier();
        var sa_dot = 0.0;
        for (var j = 0u; j < N; j++) {
            sa_dot += s[j] * sa[j];
        }
        var yi = 0.0;
        for (var j = 0u; j < N; j++) {
            s[j] = s[j] * sw[j] + sa_dot * sb[j] + v * sk[j];
            yi += s[j] * sr[j];
        }
        let mean = sum4(vec4<f32>(yi, 0.0, 0.0, 0.0), lane).x / f32(N);
        let dy = yi - mean;
        let variance = sum4(vec4<f32>(dy * dy, 0.0, 0.0, 0.0), lane).x / f32(N);
        let normed = dy * inverseSqrt(variance + GN_EPS) * ln_w + ln_b;
        y[t * p.c + c] = (normed + sums.y * v) * cur.g;
        cur = next;
    }
    for (var j = 0u; j < N; j++) {
        state[s_row + j] = s[j];
    }
}

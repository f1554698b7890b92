// The whole time-mix core of one layer (wkv7_common.wgsl) in one dispatch, one workgroup of N
// invocations per head; invocation i owns row i of the head's state (N fp32). Tokens run one
// after another inside the dispatch, which suits a decode step; chunks of several tokens take
// the three passes of wkv7_chunk.wgsl, which keep the serial part small.

@group(0) @binding(0) var<uniform> p: WkvParams;  // this layer's offsets
@group(0) @binding(1) var<uniform> step: Step;  // T
@group(0) @binding(2) var<storage, read> proj: array<f32>;  // (3, t_max, C): r, k, v (+ LoRA regions after)
@group(0) @binding(3) var<storage, read> mix: array<f32>;  // (4, t_max, C): w, a, v LoRA outputs and gate g
@group(0) @binding(4) var<storage, read> vecs: array<f32>;  // per-layer vectors (C) at the offsets above
@group(0) @binding(5) var<storage, read_write> v_first: array<f32>;  // (t_max, C)
@group(0) @binding(6) var<storage, read_write> state: array<f32>;  // S (H, N, N) fp32
@group(0) @binding(7) var<storage, read_write> y: array<f32>;  // (T, C)

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

// Layer norm over C per token, one workgroup per token (eps 1e-5, two-pass variance).
// `layer_norm_shift` also keeps the token-shift state: it writes (T + 1, C) rows, row t + 1
// for token t, and the workgroup of the last token moves the state's x_prev into row 0 and
// its own output into the state (the only invocations that touch it, so there is no race).

struct NormParams {
    c: u32,  // C
    weight: u32,  // first float of the weight in `vecs` (bias at `bias`)
    bias: u32,
    state: u32,  // first float of x_prev in `state` (layer_norm_shift)
    last_only: u32,  // layer_norm: 1 = normalise only token T - 1 into row 0 (logits of the last token)
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: NormParams;  // sizes and offsets of this op
@group(0) @binding(1) var<uniform> step: Step;  // T
@group(0) @binding(2) var<storage, read> src: array<f32>;  // (T, C)
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;  // (T, C), or (T + 1, C) with shift
@group(0) @binding(4) var<storage, read> vecs: array<f32>;  // weight, bias (C)
@group(0) @binding(5) var<storage, read_write> state: array<f32>;  // x_prev (C) of this layer

// (mean, 1 / std) of source row t.
fn moments(t: u32, lane: Lane) -> vec2<f32> {
    let base = t * p.c;
    var s = 0.0;
    for (var i = lane.index; i < p.c; i += WG) {
        s += src[base + i];
    }
    let mean = sum4(vec4<f32>(s, 0.0, 0.0, 0.0), lane).x / f32(p.c);
    var q = 0.0;
    for (var i = lane.index; i < p.c; i += WG) {
        let d = src[base + i] - mean;
        q += d * d;
    }
    let variance = sum4(vec4<f32>(q, 0.0, 0.0, 0.0), lane).x / f32(p.c);
    return vec2<f32>(mean, inverseSqrt(variance + 1e-5));
}

fn normed(t: u32, i: u32, m: vec2<f32>) -> f32 {
    return (src[t * p.c + i] - m.x) * m.y * vecs[p.weight + i] + vecs[p.bias + i];
}

@compute @workgroup_size(WG)
fn layer_norm(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = select(wid.x, step.t - 1u, p.last_only == 1u);
    let row = select(t, 0u, p.last_only == 1u);
    let m = moments(t, lane);
    for (var i = lane.index; i < p.c; i += WG) {
        dst[row * p.c + i] = normed(t, i, m);
    }
}

@compute @workgroup_size(WG)
fn layer_norm_shift(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = wid.x;
    let m = moments(t, lane);
    let last = t == step.t - 1u;
    for (var i = lane.index; i < p.c; i += WG) {
        let y = normed(t, i, m);
        dst[(t + 1u) * p.c + i] = y;
        if last {
            dst[i] = state[p.state + i];
            state[p.state + i] = y;
        }
    }
}

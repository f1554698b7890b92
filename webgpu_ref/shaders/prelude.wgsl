// Shared by every op. The host puts before it: `enable f16;` when used, the op's constants
// (`const WG: u32 = ...;`), one weights_*.wgsl and one reduce_*.wgsl.

struct Step {
    t: u32,  // tokens in this chunk: the ops read their inputs as (T, width) rows
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

// Epilogues of the linear ops.
const ACT_NONE: u32 = 0u;
const ACT_TANH: u32 = 1u;
const ACT_SIGMOID: u32 = 2u;
const ACT_RELU_SQ: u32 = 3u;  // relu(y)^2, the channel-mix hidden activation
const ACT_ADD: u32 = 4u;  // residual: out += y
const NO_MIX: u32 = 0xffffffffu;  // a linear group that reads its input as it is (no token shift)

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

// tanh saturates long before |x| = 15; the clamp keeps exp-based implementations off inf/inf.
fn tanh_safe(x: f32) -> f32 {
    return tanh(clamp(x, -15.0, 15.0));
}

fn div_ceil(a: u32, b: u32) -> u32 {
    return (a + b - 1u) / b;
}

// Workgroups are numbered flat over a 2-D grid (the x size is capped at 65535).
fn flat_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

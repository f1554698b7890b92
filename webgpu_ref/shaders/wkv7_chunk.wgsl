// The time-mix core of one layer (wkv7_common.wgsl) for a chunk of T tokens, in three passes
// so that only the recurrence itself runs token after token:
//   prep    (head, token) workgroups of N: decay, k', -kk, kk * a and v' of every token, in
//           place over the inputs they come from (mix w / a / v regions, proj k / v regions)
//   scan    one workgroup of N * L per head: S and y = S r, token after token
//   finish  (head, token) workgroups of N: GroupNorm, bonus and gate, in place over y
// In the scan, invocation (i, q) owns columns 16q .. 16q + 15 of state row i (L = N / 16
// invocations per row, consecutive, so a row's sums are subgroup shuffles) in four vec4
// registers. The per-token vectors of STAGE tokens (a constant the host sets from the
// workgroup-memory limit) are staged in workgroup memory at a time; every invocation of a row
// reads the same words (broadcasts).

@group(0) @binding(0) var<uniform> p: WkvParams;  // this layer's offsets
@group(0) @binding(1) var<uniform> step: Step;  // T
@group(0) @binding(2) var<storage, read_write> proj: array<f32>;  // (3, t_max, C): r, k -> k', v -> v'
@group(0) @binding(3) var<storage, read_write> mix: array<f32>;  // (4, t_max, C): w, a, v LoRA -> decay, -kk, kk a; g
@group(0) @binding(4) var<storage, read> vecs: array<f32>;  // per-layer vectors (C) at the offsets in p
@group(0) @binding(5) var<storage, read_write> v_first: array<f32>;  // (t_max, C)
@group(0) @binding(6) var<storage, read_write> state: array<f32>;  // S (H, N, N) fp32
@group(0) @binding(7) var<storage, read_write> y: array<f32>;  // (T, C): S r, then the output

const L: u32 = N / 16u;  // scan invocations per state row
const NV: u32 = N / 4u;  // vec4s per head vector
const FIELDS: u32 = 5u;  // staged vectors per token: r, decay, k', -kk, kk a (then v' apart)

var<workgroup> staged: array<array<vec4<f32>, NV>, FIELDS * STAGE>;  // [field * STAGE + token][column / 4]
var<workgroup> staged_v: array<array<f32, N>, STAGE>;  // v' [token][row]

@compute @workgroup_size(WG)  // WG = N
fn prep(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    if wid.y >= step.t {
        return;  // the whole workgroup: a grid for more tokens than this chunk has
    }
    let c = wid.x * N + lane.index;
    let o = wid.y * p.c + c;  // token wid.y
    let region = p.t_max * p.c;
    let k = proj[region + o];
    let v = proj[2u * region + o];
    let a = sigmoid(vecs[p.a0 + c] + mix[region + o]);
    let kk = k * vecs[p.k_k + c];
    let kk_n = kk / max(sqrt(sum4(vec4<f32>(kk * kk, 0.0, 0.0, 0.0), lane).x), L2_EPS);
    if p.layer0 == 1u {
        v_first[o] = v;
    } else {
        proj[2u * region + o] = v + (v_first[o] - v) * sigmoid(vecs[p.v0 + c] + mix[2u * region + o]);
    }
    proj[region + o] = k * (1.0 + (a - 1.0) * vecs[p.k_a + c]);
    mix[o] = exp(-DECAY_SCALE * sigmoid(vecs[p.w0 + c] + mix[o]));
    mix[region + o] = -kk_n;
    mix[2u * region + o] = kk_n * a;
}

@compute @workgroup_size(WG)  // WG = N * L
fn scan(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let T = step.t;
    let head = wid.x * N;
    let row = lane.index / L;
    let q = 4u * (lane.index % L);  // first vec4 of this invocation's columns
    let s_at = p.state + (head + row) * N + 4u * q;
    var s0 = vec4<f32>(state[s_at], state[s_at + 1u], state[s_at + 2u], state[s_at + 3u]);
    var s1 = vec4<f32>(state[s_at + 4u], state[s_at + 5u], state[s_at + 6u], state[s_at + 7u]);
    var s2 = vec4<f32>(state[s_at + 8u], state[s_at + 9u], state[s_at + 10u], state[s_at + 11u]);
    var s3 = vec4<f32>(state[s_at + 12u], state[s_at + 13u], state[s_at + 14u], state[s_at + 15u]);
    for (var t0 = 0u; t0 < T; t0 += STAGE) {
        let n = min(STAGE, T - t0);
        // Invocation (tt0, j) stages channel j of tokens tt0, tt0 + L, ...: six independent loads
        // per token, and a trip count the compiler knows, so that it can unroll the loop and
        // put every load in flight at once.
        let j = lane.index % N;
        for (var u = 0u; u < STAGE / L; u++) {
            let tt = lane.index / N + u * L;
            var r = 0.0;  // tokens past the chunk's end stage zeros
            var w = 0.0;
            var k = 0.0;
            var na = 0.0;
            var b = 0.0;
            var v = 0.0;
            if tt < n {
                let o = (t0 + tt) * p.c + head + j;
                let region = p.t_max * p.c;
                r = proj[o];
                w = mix[o];
                k = proj[region + o];
                na = mix[region + o];
                b = mix[2u * region + o];
                v = proj[2u * region + o];
            }
            staged[tt][j / 4u][j % 4u] = r;
            staged[STAGE + tt][j / 4u][j % 4u] = w;
            staged[2u * STAGE + tt][j / 4u][j % 4u] = k;
            staged[3u * STAGE + tt][j / 4u][j % 4u] = na;
            staged[4u * STAGE + tt][j / 4u][j % 4u] = b;
            staged_v[tt][j] = v;
        }
        workgroupBarrier();
        for (var tt = 0u; tt < n; tt++) {
            let r = tt;  // staged rows of this token's fields
            let w = STAGE + tt;
            let k = 2u * STAGE + tt;
            let na = 3u * STAGE + tt;
            let b = 4u * STAGE + tt;
            let sa = lanes_sum(dot(s0, staged[na][q]) + dot(s1, staged[na][q + 1u]) + dot(s2, staged[na][q + 2u])
                               + dot(s3, staged[na][q + 3u]), L, lane);
            let v = staged_v[tt][row];
            s0 = s0 * staged[w][q] + sa * staged[b][q] + v * staged[k][q];
            s1 = s1 * staged[w][q + 1u] + sa * staged[b][q + 1u] + v * staged[k][q + 1u];
            s2 = s2 * staged[w][q + 2u] + sa * staged[b][q + 2u] + v * staged[k][q + 2u];
            s3 = s3 * staged[w][q + 3u] + sa * staged[b][q + 3u] + v * staged[k][q + 3u];
            let yi = lanes_sum(dot(s0, staged[r][q]) + dot(s1, staged[r][q + 1u]) + dot(s2, staged[r][q + 2u])
                               + dot(s3, staged[r][q + 3u]), L, lane);
            if q == 0u {
                y[(t0 + tt) * p.c + head + row] = yi;
            }
        }
        workgroupBarrier();
    }
    state[s_at] = s0.x; state[s_at + 1u] = s0.y; state[s_at + 2u] = s0.z; state[s_at + 3u] = s0.w;
    state[s_at + 4u] = s1.x; state[s_at + 5u] = s1.y; state[s_at + 6u] = s1.z; state[s_at + 7u] = s1.w;
    state[s_at + 8u] = s2.x; state[s_at + 9u] = s2.y; state[s_at + 10u] = s2.z; state[s_at + 11u] = s2.w;
    state[s_at + 12u] = s3.x; state[s_at + 13u] = s3.y; state[s_at + 14u] = s3.z; state[s_at + 15u] = s3.w;
}

@compute @workgroup_size(WG)  // WG = N
fn finish(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    if wid.y >= step.t {
        return;  // the whole workgroup
    }
    let c = wid.x * N + lane.index;
    let o = wid.y * p.c + c;
    let region = p.t_max * p.c;
    let yi = y[o];
    let sums = sum4(vec4<f32>(yi, proj[o] * proj[region + o] * vecs[p.r_k + c], 0.0, 0.0), lane);
    let dy = yi - sums.x / f32(N);
    let variance = sum4(vec4<f32>(dy * dy, 0.0, 0.0, 0.0), lane).x / f32(N);
    let normed = dy * inverseSqrt(variance + GN_EPS) * vecs[p.ln_w + c] + vecs[p.ln_b + c];
    y[o] = (normed + sums.y * proj[2u * region + o]) * mix[3u * region + o];
}

// Workgroup sums without subgroups: a tree in workgroup memory (WG is a power of two).

struct Lane {
    @builtin(local_invocation_index) index: u32,
}

var<workgroup> partial: array<vec4<f32>, WG>;

// The sum of `v` over the workgroup, returned to every invocation. Call in uniform control flow.
fn sum4(v: vec4<f32>, lane: Lane) -> vec4<f32> {
    partial[lane.index] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lane.index < s {
            partial[lane.index] += partial[lane.index + s];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

// The sum of `v` over each run of `lanes` consecutive invocations, returned to all of them.
// Call in uniform control flow.
fn lanes_sum(v: f32, lanes: u32, lane: Lane) -> f32 {
    partial[lane.index].x = v;
    workgroupBarrier();
    let first = lane.index - lane.index % lanes;
    var s = 0.0;
    for (var m = 0u; m < lanes; m++) {
        s += partial[first + m].x;
    }
    workgroupBarrier();
    return s;
}

// Workgroup sums through subgroup adds: one partial per subgroup in workgroup memory.
// Subgroups are assumed to cover consecutive local indices (true of 1-D workgroups on every
// driver we know); any subgroup size works, including one larger than the workgroup.

struct Lane {
    @builtin(local_invocation_index) index: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_size) sg_size: u32,
}

var<workgroup> partial: array<vec4<f32>, WG>;

// The sum of `v` over the workgroup, returned to every invocation. Call in uniform control flow.
fn sum4(v: vec4<f32>, lane: Lane) -> vec4<f32> {
    let s = subgroupAdd(v);
    if lane.sg_lane == 0u {
        partial[lane.index / lane.sg_size] = s;
    }
    workgroupBarrier();
    var total = partial[0];
    for (var i = 1u; i < div_ceil(WG, lane.sg_size); i++) {
        total += partial[i];
    }
    workgroupBarrier();
    return total;
}

// The sum of `v` over each run of `lanes` consecutive invocations (a power of two no larger than
// the subgroup), returned to all of them. Call in uniform control flow.
fn lanes_sum(v: f32, lanes: u32, lane: Lane) -> f32 {
    var s = v;
    for (var m = 1u; m < lanes; m <<= 1u) {
        s += subgroupShuffleXor(s, m);
    }
    return s;
}

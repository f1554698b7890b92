// Metal prelude: maps the portable kernel vocabulary onto Metal (MLX adds <metal_stdlib>).
#define SHARED threadgroup
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define DEVICE_FN inline

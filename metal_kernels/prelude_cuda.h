// CUDA prelude: maps the portable kernel vocabulary onto CUDA (MLX adds the fp16/bf16 headers).
typedef unsigned int uint;
#define SHARED __shared__
#define BARRIER() __syncthreads()
#define DEVICE_FN __device__ __forceinline__

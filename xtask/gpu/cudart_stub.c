/*
 * Stand-ins for the CUDA runtime functions that candle's quantized-matmul and mixture-of-experts
 * kernels (compiled into candle-kernels, never called by DSR) import from libcudart. The CUDA
 * build links them against the build machine's libcudart; the binaries are patched to import them
 * from this library instead (xtask/gpu/build.sh), so that they start on a machine with another
 * CUDA major version. The fat-binary registration run at start-up does nothing; every other call
 * fails with cudaErrorNotSupported (801).
 */
#include <stddef.h>

static void *handle[4];

void **__cudaRegisterFatBinary(void *fatbin) { (void)fatbin; return handle; }
void __cudaRegisterFatBinaryEnd(void **h) { (void)h; }
void __cudaUnregisterFatBinary(void **h) { (void)h; }
void __cudaRegisterFunction(void) {}
void __cudaRegisterVar(void) {}
unsigned __cudaPushCallConfiguration(void) { return 801; }
int __cudaPopCallConfiguration(void) { return 801; }

#define FAIL(name) int name(void) { return 801; }
FAIL(cudaDeviceGetAttribute)
FAIL(cudaFree)
FAIL(cudaFreeAsync_ptsz)
FAIL(cudaFuncGetAttributes)
FAIL(cudaFuncSetAttribute)
FAIL(cudaGetDevice)
FAIL(cudaGetDeviceCount)
FAIL(cudaGetLastError)
FAIL(cudaLaunchKernel_ptsz)
FAIL(cudaMalloc)
FAIL(cudaMallocAsync_ptsz)
FAIL(cudaMemsetAsync_ptsz)
FAIL(cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags)
FAIL(cudaPeekAtLastError)
FAIL(cudaSetDevice)
FAIL(cudaStreamSynchronize_ptsz)

const char *cudaGetErrorName(int e) { (void)e; return "cudaErrorNotSupported"; }
const char *cudaGetErrorString(int e) { (void)e; return "operation not supported (stand-in libcudart)"; }

// The peer-access check of every workspace transport (flashcomm_cupy/backends/ipc.py,
// check_canaries): one thread stores a value into a peer's workspace through the mapping
// being tested and reads it back, so a mapping that does not reach the peer fails here,
// on purpose and boundedly, instead of inside a collective.
extern "C" __global__ void fc_canary(unsigned int* dst, unsigned int value, unsigned int* back) {
  *(volatile unsigned int*)dst = value;
  __threadfence_system();
  back[0] = *(volatile unsigned int*)dst;
}

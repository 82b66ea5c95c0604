// The forward kernels of huber_kernel.h, compiled per instruction set (isa_instantiate.h). A translation
// unit of their own: the forward and backward halves build in parallel, without the ATen headers.
#include "huber_args.h"

#define LF_KERNEL_HEADER "huber_kernel.h"
#include "isa_instantiate.h"

namespace lossfuse {

void run_huber_forward(const HuberArgs& a) { LF_RUN_KERNEL(huber_forward, a, a.numel); }

}  // namespace lossfuse

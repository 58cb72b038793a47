// The fused Adam kernels built for one instruction set (build_flags.py has its flags).
#include "adam.h"

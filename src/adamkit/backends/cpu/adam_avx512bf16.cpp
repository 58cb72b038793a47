// The fused Adam kernels built for one instruction set (see setup.py for its flags).
#include "adam.h"

"""Running a quantized model: token generation (`lowbit generate`) on the kernels of `lowbit.kernels`."""

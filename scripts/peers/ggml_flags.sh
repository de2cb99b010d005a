# Sourced by the llama.cpp peers (llama-server, llama-cpp-python): they are built for this CPU, but without ggml's
# AMX matmul. On a Xeon with AMX (in a VM) both crashed in ggml_backend_amx_mul_mat at their first graph (SIGSEGV),
# so AMX is left to the AVX-512 kernels. On a CPU without AMX the flags change nothing.
# shellcheck disable=SC2034  # read by the scripts that source this one
ggml_cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

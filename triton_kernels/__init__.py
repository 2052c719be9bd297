"""Triton kernels (@triton.jit functions) and their launch wrappers; installed as
`coreset_ext.triton_kernels`. Import only where Triton is available."""

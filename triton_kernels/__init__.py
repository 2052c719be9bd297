"""Triton kernels (@triton.jit functions) and their launch wrappers; installed as
`coreset_ext.triton_kernels`. Import only where Triton is available.

    _tiles.py       @triton.jit pieces shared by the kernels, and their constants
    launch.py       host-side helpers of the launch wrappers
    contrastive.py, similarity.py, kmeans.py    one kernel family per file

Names, in every file: kernels `_<op>[_<pass>]_kernel` (autotuned versions `_<op>[_<pass>]_tuned`),
@triton.jit helpers plain verbs (`load_rows`, `update_lse`), launch wrappers `<op>[_<pass>]`.
Kernel arguments: pointers `<tensor>_ptr`, row strides `stride_<tensor>`, reciprocal row norms
`inv_<tensor>`, sizes `n_rows`, `n_cols`, `d`, compile-time flags and block sizes in capitals
(BLOCK_M rows, BLOCK_N columns, BLOCK_D features); in the kernels, `rows`, `cols`, `dims` and their
masks `row_ok`, `col_ok`, `dim_ok`. Each module's launch configuration is public, for tools
(tools/triton_aot.py): fixed tiles `tiles(...)` or `TILES`, autotuning candidates `CONFIGS`, and
`autotune(x)`, whether a launch autotunes (an opt-in: launch.autotune_enabled).
"""

/*
 * reflinkfs.core._sums -- the xxh3-64 checksum of every 4 KiB block of a
 * buffer, in one call.
 *
 * Every block written or read from the data file is checksummed (see
 * blockio.py).  Doing that block by block from Python costs a call per 4 KiB,
 * several times the hashing itself; here one call hashes a whole buffer, with
 * the GIL released, and returns the values packed the way the csums table
 * stores them (schema.pack_sums: 8 bytes per block, little-endian).  The
 * values are those of xxhash.xxh3_64_intdigest(block): XXH3_64bits, seed 0,
 * from the system's libxxhash (libxxhash-dev).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <xxhash.h>
#if defined(__x86_64__)
/* libxxhash's entry points that pick the widest vector unit of the CPU at run
 * time (AVX2 where there is one; plain XXH3_64bits is built for SSE2). */
#include <xxh_x86dispatch.h>
#define BLOCK_HASH XXH3_64bits_dispatch
#else
#define BLOCK_HASH XXH3_64bits
#endif

#define BLOCK 4096

static void store_le64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static PyObject *block_sums(PyObject *mod, PyObject *arg)
{
    Py_buffer in;
    if (PyObject_GetBuffer(arg, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    if (in.len % BLOCK) {
        PyBuffer_Release(&in);
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes is not a whole number of %d-byte blocks",
                     in.len, BLOCK);
        return NULL;
    }
    Py_ssize_t n = in.len / BLOCK;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (out == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    const unsigned char *src = in.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        store_le64(dst + 8 * i, BLOCK_HASH(src + (size_t)i * BLOCK, BLOCK));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    return out;
}

static PyMethodDef methods[] = {
    {"block_sums", block_sums, METH_O,
     "block_sums(buffer) -> bytes: the xxh3-64 of each 4096-byte block, 8 bytes little-endian each."},
    {NULL}
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "reflinkfs.core._sums",
    .m_doc = "xxh3-64 checksums of the 4 KiB blocks of a buffer, in one call.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__sums(void)
{
    return PyModule_Create(&moduledef);
}

/*
 * reflinkfs.fuse._extops -- add copy_file_range and fallocate handlers to
 * pyfuse3 sessions without modifying pyfuse3.
 *
 * pyfuse3 3.5 builds a `struct fuse_lowlevel_ops` table without
 * copy_file_range / fallocate and hands it to libfuse's fuse_session_new().
 * This module exports its own `fuse_session_new@@FUSE_3.0` (see extops.map).
 * When the module is loaded with RTLD_GLOBAL *before* pyfuse3's extension is
 * loaded, the dynamic linker binds pyfuse3's reference to
 * fuse_session_new@FUSE_3.0 to our definition (global scope is searched in
 * load order and we come before libfuse3).  Our definition copies the ops
 * table, plugs in the two C handlers below and forwards to the real libfuse
 * function obtained with dlvsym(RTLD_NEXT, ...).
 *
 * fuse_session_destroy is interposed the same way so that a Request object
 * that outlives its session never touches freed libfuse memory.
 *
 * fuse_session_process_buf is interposed too, for two things.  The second is
 * the chains (below).  The first: Linux 6.18 sends
 * FUSE_COPY_FILE_RANGE_64 first, which libfuse 3.14 does not know and
 * answers ENOSYS.  The kernel then retries with FUSE_COPY_FILE_RANGE, but
 * when two first copies race, the second ENOSYS is taken for the older
 * request's and copy_file_range is switched off for the whole mount (every
 * later copy goes through the page cache in 64 KiB pieces: no sharing, and
 * not atomic).  The two requests carry the same arguments, and on a
 * little-endian machine the older reply (a 32-bit count, then 32 zero bits)
 * reads as the newer one's 64-bit count, so a COPY_FILE_RANGE_64 request is
 * relabelled as COPY_FILE_RANGE before libfuse sees it.  op_copy_file_range
 * keeps every count below 4 GiB (a shorter copy is allowed; callers loop).
 *
 * The same table copy also routes `read` through op_read below once a
 * Python read handler is registered (set_read_handler).  The handler is
 * called synchronously and returns the reply as a list of buffers, which go
 * to the kernel with one fuse_reply_iov(): a read served from several cache
 * units is never joined into one new buffer.  Without a handler, pyfuse3's
 * own read handler serves the request as before.  `write` goes the same way
 * through op_write once set_write_handler() registers a handler, which is
 * called synchronously with the data (no coroutine per write; a big write's
 * data is not even copied: see WriteData) and may pass a write on to
 * pyfuse3's handler, e.g. one that must wait.
 *
 * Chains: pyfuse3's loop goes through trio for every request (a lock,
 * wait_readable, a task switch), which costs more than serving a cached read.
 * So after a request a handler answered inline (a read, a write, or one of
 * the metadata requests of set_meta_handlers), the
 * interposed fuse_session_process_buf waits up to chain_wait_ns for the next
 * request (ppoll, GIL released) and, if one comes, receives it into the same
 * buffer and processes it at once.  The chain goes on while the requests are
 * such requests and ends at the first other request (or one a handler
 * passes on to pyfuse3): that one is processed the usual
 * way, and the coroutine pyfuse3's handler left for it is awaited by
 * pyfuse3's loop as soon as we return.  A chain ends after CHAIN_MAX requests
 * or CHAIN_MAX_NS, at a timeout, a signal, an error or session exit, so the
 * loop's other work (timers, signals, other requests' tasks) waits at most
 * about that long.  A failed receive leaves the error for the loop to see.
 *
 * The C handlers run inside fuse_session_process_buf(), which pyfuse3 calls
 * from trio's thread with the GIL held.  They still use PyGILState_Ensure so
 * they are correct from any thread.  Each handler wraps the fuse_req_t in a
 * `Request` object and calls the Python callable registered with
 * set_handlers().  The callable (or whoever it hands the Request to) must
 * reply exactly once with req.reply_write(n) / req.reply_err(errno).  A
 * Request deallocated without a reply answers EIO, so the kernel never waits
 * forever.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>

#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <malloc.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>

#define EXPORT __attribute__((visibility("default")))

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *,
                                               size_t, struct libfuse_version *, void *);
typedef void (*session_destroy_fn)(struct fuse_session *);
typedef void (*process_buf_fn)(struct fuse_session *, const struct fuse_buf *);

/* The start of every request on /dev/fuse (struct fuse_in_header of the FUSE
 * protocol; libfuse does not install its copy of the kernel header). */
struct wire_in_header {
    uint32_t len;
    uint32_t opcode;
    uint64_t unique;
};
#define WIRE_COPY_FILE_RANGE 47
#define WIRE_COPY_FILE_RANGE_64 53
#define WIRE_LOOKUP 1
#define WIRE_FORGET 2
#define WIRE_GETATTR 3
#define WIRE_UNLINK 10
#define WIRE_BATCH_FORGET 42
#define WIRE_OPEN 14
#define WIRE_RELEASE 18
#define WIRE_FLUSH 25
#define WIRE_CREATE 35
#define WIRE_OPENDIR 27
#define WIRE_RELEASEDIR 29
#define WIRE_READDIRPLUS 44
#define WIRE_READ 15
#define WIRE_WRITE 16
/* The largest count one reply may carry: the older request's reply has 32
 * bits for it (the kernel clamps the older request's length the same way). */
#define COPY_MAX ((size_t)0xfffff000u)

/* ---- global state (protected by the GIL where Python touches it) ------- */

static PyObject *h_copy_file_range = NULL; /* strong refs or NULL */
static PyObject *h_fallocate = NULL;
static PyObject *h_read = NULL;            /* read(fh, off, size) -> buffers | errno */
static PyObject *h_write = NULL;           /* write(fh, off, data) -> count | -errno | None */
static PyObject *h_lookup = NULL;          /* lookup(parent, name) -> attributes | errno | None */
static PyObject *h_getattr = NULL;         /* getattr(ino) -> attributes | errno | None */
static PyObject *h_unlink = NULL;          /* unlink(parent, name) -> 0 | errno | None */
static PyObject *h_forget = NULL;          /* forget([(ino, nlookup), ...]) */
static double g_entry_timeout = 1.0, g_attr_timeout = 1.0;   /* for the replies of h_lookup / h_getattr */
static PyObject *h_open = NULL;            /* open(ino, flags, pid) -> fh | -errno | None */
static PyObject *h_create = NULL;          /* create(parent, name, mode, flags, uid, gid, umask, pid)
                                              -> (fh, attributes) | -errno | None */
static PyObject *h_tmpfile = NULL;         /* tmpfile(parent, mode, flags, uid, gid, umask, pid)
                                              -> (fh, attributes) | -errno | None */
static PyObject *h_release = NULL;         /* release(fh) -> 0 | errno | None */
static int g_dont_mask = 0;                /* ask for FUSE_CAP_DONT_MASK at INIT (set_dont_mask) */
static PyObject *h_lseek = NULL;           /* lseek(fh, off, whence) -> offset | -errno | None */
static int g_direct_io = 0, g_keep_cache = 0;   /* for the replies of h_open / h_create */
static int g_no_flush = 0;                 /* FLUSH is answered ENOSYS: the kernel sends no more */
static PyObject *h_opendir = NULL;         /* opendir(ino) -> fh | -errno | None */
static PyObject *h_readdir = NULL;         /* readdir(fh, off, size) -> [(name, attributes, next_off)]
                                              | errno | None */
static PyObject *h_releasedir = NULL;      /* releasedir(fh) -> 0 | errno | None */
static PyObject *h_looked_up = NULL;       /* looked_up(ino): an entry readdirplus replied */
static int g_passed = 0;                   /* the last request went to pyfuse3's handler after all */
static PyObject *last_exc = NULL;          /* last exception raised by a handler */

static volatile int g_interposed = 0;
/* What INIT negotiated (see op_init); read by negotiated(). */
static int g_init_done = 0, g_allow_mmap = 0;
static unsigned g_proto_major = 0, g_proto_minor = 0;
static unsigned long long n_copy_file_range = 0;
static unsigned long long n_copy_file_range_64 = 0; /* ... of them sent as COPY_FILE_RANGE_64 */
static unsigned long long n_fallocate = 0;
static unsigned long long n_default_replies = 0; /* ENOSYS/EOPNOTSUPP fallbacks */
static unsigned long long n_dropped = 0;         /* Requests replied EIO in dealloc */
static unsigned long long n_chained = 0;         /* requests received by a chain */
#define CHAIN_MAX 256                            /* requests per chain, at most, */
#define CHAIN_MAX_NS 2000000LL                   /* ... and time: the loop's other work waits meanwhile */
static long chain_wait_ns = 100000;              /* how long a chain waits for the next request */
static unsigned long long n_read = 0;            /* reads served by h_read */
static unsigned long long n_write = 0;           /* writes given to h_write ... */
static unsigned long long n_write_passed = 0;    /* ... of which it passed on to pyfuse3 (None) */
static unsigned long long n_meta = 0;            /* lookups, getattrs, unlinks, forgets given to handlers ... */
static unsigned long long n_meta_passed = 0;     /* ... of which they passed on to pyfuse3 (None) */

typedef void (*read_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
static read_fn orig_read = NULL;                 /* pyfuse3's read handler */
typedef void (*write_fn)(fuse_req_t, fuse_ino_t, const char *, size_t, off_t, struct fuse_file_info *);
static write_fn orig_write = NULL;               /* pyfuse3's write handler */
typedef void (*name_fn)(fuse_req_t, fuse_ino_t, const char *);
static name_fn orig_lookup = NULL, orig_unlink = NULL;
typedef void (*getattr_fn)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static getattr_fn orig_getattr = NULL;
typedef void (*forget_fn)(fuse_req_t, fuse_ino_t, uint64_t);
static forget_fn orig_forget = NULL;
typedef void (*forget_multi_fn)(fuse_req_t, size_t, struct fuse_forget_data *);
static forget_multi_fn orig_forget_multi = NULL;
typedef void (*file_fn)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static file_fn orig_open = NULL, orig_flush = NULL, orig_release = NULL;
typedef void (*create_fn)(fuse_req_t, fuse_ino_t, const char *, mode_t, struct fuse_file_info *);
static create_fn orig_create = NULL;
typedef void (*tmpfile_fn)(fuse_req_t, fuse_ino_t, mode_t, struct fuse_file_info *);
static tmpfile_fn orig_tmpfile = NULL;
typedef void (*lseek_fn)(fuse_req_t, fuse_ino_t, off_t, int, struct fuse_file_info *);
static lseek_fn orig_lseek = NULL;               /* NULL: pyfuse3 has no lseek */
static file_fn orig_opendir = NULL, orig_releasedir = NULL;
static read_fn orig_readdirplus = NULL;
typedef void (*init_fn)(void *, struct fuse_conn_info *);
static init_fn orig_init = NULL;                 /* pyfuse3's init */

/* Sessions created through us, and a generation counter bumped whenever one
 * of them is destroyed.  A Request records the generation it was created in;
 * if the session died in between, the request is abandoned instead of being
 * replied (replying would be a use-after-free inside libfuse). */
static unsigned long g_session_gen = 0;

/* ---- Request object ---------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    fuse_req_t req;        /* NULL once replied (or abandoned) */
    unsigned long gen;     /* g_session_gen at creation */
    const char *op;        /* "copy_file_range" / "fallocate" */
    unsigned long uid, gid, pid;
    int replied;
} RequestObject;

static PyTypeObject Request_Type;

static PyObject *Request_new(fuse_req_t req, const char *op)
{
    RequestObject *self = PyObject_New(RequestObject, &Request_Type);
    if (self == NULL)
        return NULL;
    self->req = req;
    self->gen = g_session_gen;
    self->op = op;
    self->replied = 0;
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    self->uid = ctx ? (unsigned long)ctx->uid : 0;
    self->gid = ctx ? (unsigned long)ctx->gid : 0;
    self->pid = ctx ? (unsigned long)ctx->pid : 0;
    return (PyObject *)self;
}

/* Take the fuse_req_t out of the object exactly once.  Returns NULL and sets
 * an exception if it was already taken. Returns NULL without an exception
 * (and *abandoned = 1) if the session has gone away. */
static fuse_req_t Request_take(RequestObject *self, int *abandoned)
{
    *abandoned = 0;
    if (self->replied || self->req == NULL) {
        PyErr_Format(PyExc_RuntimeError,
                     "%s request has already been replied to", self->op);
        return NULL;
    }
    fuse_req_t r = self->req;
    self->req = NULL;
    self->replied = 1;
    if (self->gen != g_session_gen) {
        *abandoned = 1;
        return NULL;
    }
    return r;
}

static PyObject *Request_reply_write(RequestObject *self, PyObject *arg)
{
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    int abandoned;
    fuse_req_t r = Request_take(self, &abandoned);
    if (r == NULL) {
        if (abandoned)
            return PyLong_FromLong(-ENOTCONN);
        return NULL;
    }
    int res;
    Py_BEGIN_ALLOW_THREADS
    res = fuse_reply_write(r, (size_t)n);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(res);
}

static PyObject *Request_reply_err(RequestObject *self, PyObject *arg)
{
    long e = PyLong_AsLong(arg);
    if (e == -1 && PyErr_Occurred())
        return NULL;
    if (e < 0) {
        PyErr_SetString(PyExc_ValueError, "errno must be >= 0");
        return NULL;
    }
    int abandoned;
    fuse_req_t r = Request_take(self, &abandoned);
    if (r == NULL) {
        if (abandoned)
            return PyLong_FromLong(-ENOTCONN);
        return NULL;
    }
    int res;
    Py_BEGIN_ALLOW_THREADS
    res = fuse_reply_err(r, (int)e);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(res);
}

static void Request_dealloc(RequestObject *self)
{
    if (!self->replied && self->req != NULL) {
        fuse_req_t r = self->req;
        self->req = NULL;
        self->replied = 1;
        if (self->gen == g_session_gen) {
            n_dropped++;
            fuse_reply_err(r, EIO);
        }
    }
    PyObject_Free(self);
}

static PyObject *Request_repr(RequestObject *self)
{
    return PyUnicode_FromFormat("<reflinkfs.fuse._extops.Request %s pid=%lu%s>",
                                self->op, self->pid,
                                self->replied ? " replied" : "");
}

static PyObject *Request_get_uid(RequestObject *s, void *c) { return PyLong_FromUnsignedLong(s->uid); }
static PyObject *Request_get_gid(RequestObject *s, void *c) { return PyLong_FromUnsignedLong(s->gid); }
static PyObject *Request_get_pid(RequestObject *s, void *c) { return PyLong_FromUnsignedLong(s->pid); }
static PyObject *Request_get_replied(RequestObject *s, void *c) { return PyBool_FromLong(s->replied); }
static PyObject *Request_get_op(RequestObject *s, void *c) { return PyUnicode_FromString(s->op); }

static PyGetSetDef Request_getset[] = {
    {"uid", (getter)Request_get_uid, NULL, "uid of the calling process", NULL},
    {"gid", (getter)Request_get_gid, NULL, "gid of the calling process", NULL},
    {"pid", (getter)Request_get_pid, NULL, "pid of the calling process", NULL},
    {"replied", (getter)Request_get_replied, NULL, "True once a reply was sent", NULL},
    {"op", (getter)Request_get_op, NULL, "'copy_file_range' or 'fallocate'", NULL},
    {NULL}
};

static PyMethodDef Request_methods[] = {
    {"reply_write", (PyCFunction)Request_reply_write, METH_O,
     "reply_write(nbytes) -> int: answer a copy_file_range request with a byte count."},
    {"reply_err", (PyCFunction)Request_reply_err, METH_O,
     "reply_err(errno) -> int: answer with an error (0 = success, e.g. for fallocate)."},
    {NULL}
};

static PyTypeObject Request_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "reflinkfs.fuse._extops.Request",
    .tp_basicsize = sizeof(RequestObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A pending FUSE request; reply exactly once.",
    .tp_dealloc = (destructor)Request_dealloc,
    .tp_repr = (reprfunc)Request_repr,
    .tp_methods = Request_methods,
    .tp_getset = Request_getset,
};

/* ---- WriteData: a big write's data, left where the kernel put it ------- */

/* A write of at least half a receive buffer reaches h_write as a WriteData:
 * a read-only buffer over the request's bytes inside libfuse's receive
 * buffer, not a copy.  If the handler keeps it (any reference, a memoryview
 * included, is still there when the handler returns), the object takes the
 * receive buffer over and the session gets another one for its next receive:
 * from a small pool of buffers freed by earlier WriteData objects, or NULL,
 * which libfuse's receive replaces with a new one.  If the handler drops it,
 * the buffer stays the session's and nothing was copied or allocated.  The
 * bytes never change either way.  Everything here runs with the GIL held. */
typedef struct {
    PyObject_HEAD
    char *block;            /* the receive buffer this object owns, or NULL */
    const char *data;       /* the write's bytes (inside block once owned) */
    Py_ssize_t len;
} WriteDataObject;

static PyTypeObject WriteData_Type;
#define POOL_MAX 8                               /* spare receive buffers kept */
static char *g_pool[POOL_MAX];
static int g_pool_n = 0;
static struct fuse_buf *g_cur = NULL;            /* the receive buffer being processed */
static unsigned long long n_write_kept = 0;      /* receive buffers handed to WriteData */

static void pool_put(char *block)
{
    if (g_pool_n < POOL_MAX)
        g_pool[g_pool_n++] = block;
    else
        free(block);
}

/* A spare buffer at least as big as `need` bytes, or NULL. */
static char *pool_get(size_t need)
{
    while (g_pool_n > 0) {
        char *b = g_pool[--g_pool_n];
        if (malloc_usable_size(b) >= need)
            return b;
        free(b);
    }
    return NULL;
}

/* The data as a WriteData when it is a big write inside the buffer being
 * processed; NULL (without an exception) when it should be copied instead. */
static PyObject *WriteData_new(const char *data, size_t size)
{
    struct fuse_buf *b = g_cur;
    if (b == NULL || (b->flags & FUSE_BUF_IS_FD) || b->mem == NULL
        || data < (const char *)b->mem || data + size > (const char *)b->mem + b->size
        || size < malloc_usable_size(b->mem) / 2)
        return NULL;
    WriteDataObject *self = PyObject_New(WriteDataObject, &WriteData_Type);
    if (self == NULL) {
        PyErr_Clear();
        return NULL;
    }
    self->block = NULL;
    self->data = data;
    self->len = (Py_ssize_t)size;
    return (PyObject *)self;
}

/* The handler kept the object: it takes the receive buffer over. */
static void WriteData_keep(WriteDataObject *self)
{
    struct fuse_buf *b = g_cur;
    char *block = b->mem;
    self->block = block;
    b->mem = pool_get(malloc_usable_size(block));
    n_write_kept++;
}

static void WriteData_dealloc(WriteDataObject *self)
{
    if (self->block != NULL)
        pool_put(self->block);
    PyObject_Free(self);
}

static int WriteData_getbuffer(WriteDataObject *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, (void *)self->data, self->len, 1, flags);
}

static Py_ssize_t WriteData_length(WriteDataObject *self)
{
    return self->len;
}

static PyObject *WriteData_repr(WriteDataObject *self)
{
    return PyUnicode_FromFormat("<WriteData of %zd bytes%s>", self->len,
                                self->block ? ", kept" : "");
}

static PyBufferProcs WriteData_as_buffer = {
    .bf_getbuffer = (getbufferproc)WriteData_getbuffer,
};

static PySequenceMethods WriteData_as_sequence = {
    .sq_length = (lenfunc)WriteData_length,
};

static PyTypeObject WriteData_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "reflinkfs.fuse._extops.WriteData",
    .tp_basicsize = sizeof(WriteDataObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A write's data (read-only buffer), where the kernel put it; never changes.",
    .tp_dealloc = (destructor)WriteData_dealloc,
    .tp_repr = (reprfunc)WriteData_repr,
    .tp_as_buffer = &WriteData_as_buffer,
    .tp_as_sequence = &WriteData_as_sequence,
};

/* ---- dispatch ---------------------------------------------------------- */

/* Move the pending Python exception into last_exc (it is never left set). */
static void keep_exception(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v != NULL && tb != NULL)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    Py_XSETREF(last_exc, v);  /* steals v (may be NULL) */
}

/* Call handler(req, *args).  On any failure (no handler, exception, object
 * creation failure) reply `fallback_errno` unless a reply was already sent.
 * Never leaves a Python exception set: pyfuse3 checks PyErr_Occurred() after
 * fuse_session_process_buf(). */
static void dispatch(fuse_req_t req, const char *op, PyObject *handler,
                     int fallback_errno, const char *fmt, ...)
{
    PyGILState_STATE gs = PyGILState_Ensure();
    PyObject *s_type, *s_val, *s_tb;                /* normally all NULL */
    PyErr_Fetch(&s_type, &s_val, &s_tb);
    RequestObject *robj = NULL;
    PyObject *args = NULL, *res = NULL;

    if (handler == NULL)
        goto fallback;
    Py_INCREF(handler);  /* set_handlers() may replace it during the call */

    robj = (RequestObject *)Request_new(req, op);
    if (robj == NULL)
        goto fail;

    va_list ap;
    va_start(ap, fmt);
    PyObject *rest = Py_VaBuildValue(fmt, ap);
    va_end(ap);
    if (rest == NULL)
        goto fail;
    /* build (req, *rest) */
    Py_ssize_t n = PyTuple_GET_SIZE(rest);
    args = PyTuple_New(n + 1);
    if (args == NULL) {
        Py_DECREF(rest);
        goto fail;
    }
    Py_INCREF(robj);
    PyTuple_SET_ITEM(args, 0, (PyObject *)robj);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyTuple_GET_ITEM(rest, i);
        Py_INCREF(it);
        PyTuple_SET_ITEM(args, i + 1, it);
    }
    Py_DECREF(rest);

    res = PyObject_Call(handler, args, NULL);
    if (res == NULL)
        goto fail;
    Py_DECREF(res);
    Py_DECREF(args);
    Py_DECREF(handler);
    /* If nobody kept a reference and nobody replied, dealloc replies EIO. */
    Py_DECREF(robj);
    goto out;

fail:
    keep_exception();
    Py_XDECREF(args);
    Py_XDECREF(handler);
    if (robj != NULL) {
        if (!robj->replied && robj->req != NULL) {
            robj->req = NULL;
            robj->replied = 1;
            n_default_replies++;
            fuse_reply_err(req, fallback_errno);
        }
        Py_DECREF(robj);
        goto out;
    }
fallback:
    n_default_replies++;
    fuse_reply_err(req, fallback_errno);
out:
    PyErr_Restore(s_type, s_val, s_tb);
    PyGILState_Release(gs);
}

static void op_copy_file_range(fuse_req_t req, fuse_ino_t ino_in, off_t off_in,
                               struct fuse_file_info *fi_in, fuse_ino_t ino_out,
                               off_t off_out, struct fuse_file_info *fi_out,
                               size_t len, int flags)
{
    __atomic_add_fetch(&n_copy_file_range, 1, __ATOMIC_RELAXED);
    dispatch(req, "copy_file_range", h_copy_file_range, ENOSYS,
             "(KKLKKLKi)",
             (unsigned long long)ino_in,
             (unsigned long long)(fi_in ? fi_in->fh : 0),
             (long long)off_in,
             (unsigned long long)ino_out,
             (unsigned long long)(fi_out ? fi_out->fh : 0),
             (long long)off_out,
             (unsigned long long)(len < COPY_MAX ? len : COPY_MAX),
             flags);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode,
                         off_t offset, off_t length, struct fuse_file_info *fi)
{
    __atomic_add_fetch(&n_fallocate, 1, __ATOMIC_RELAXED);
    dispatch(req, "fallocate", h_fallocate, EOPNOTSUPP,
             "(KKiLL)",
             (unsigned long long)ino,
             (unsigned long long)(fi ? fi->fh : 0),
             mode, (long long)offset, (long long)length);
}

#define READ_STACK_PARTS 40

/* A handler's result that cannot be replied: EIO, and the reason kept. */
static void reply_bad(fuse_req_t req, const char *op, PyObject *res)
{
    if (res != NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "%s handler returned %R", op, res);
    keep_exception();
    n_default_replies++;
    fuse_reply_err(req, EIO);
}

/* Reply to a read with the handler's answer: a list or tuple of buffers
 * (sent as they are, one iovec each), an int errno, or any one buffer. */
static int reply_read(fuse_req_t req, PyObject *res)
{
    if (PyLong_Check(res)) {
        long e = PyLong_AsLong(res);
        if (e <= 0 || e > 4095) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "read handler returned errno %ld", e);
            return -1;
        }
        fuse_reply_err(req, (int)e);
        return 0;
    }
    if (!PyList_CheckExact(res) && !PyTuple_CheckExact(res)) {
        Py_buffer one;
        if (PyObject_GetBuffer(res, &one, PyBUF_SIMPLE) < 0)
            return -1;
        fuse_reply_buf(req, one.buf, (size_t)one.len);
        PyBuffer_Release(&one);
        return 0;
    }
    PyObject **items = PySequence_Fast_ITEMS(res);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(res);
    if (n == 0) {
        fuse_reply_buf(req, NULL, 0);
        return 0;
    }
    Py_buffer stack_views[READ_STACK_PARTS];
    struct iovec stack_iov[READ_STACK_PARTS] = {{0}};
    Py_buffer *views = stack_views;
    struct iovec *iov = stack_iov;
    if (n > READ_STACK_PARTS) {
        views = PyMem_Malloc(n * sizeof(*views));
        iov = PyMem_Malloc(n * sizeof(*iov));
        if (views == NULL || iov == NULL) {
            PyMem_Free(views);
            PyMem_Free(iov);
            PyErr_NoMemory();
            return -1;
        }
    }
    Py_ssize_t got = 0;
    int rc = 0;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(items[got], &views[got], PyBUF_SIMPLE) < 0) {
            rc = -1;
            break;
        }
        iov[got].iov_base = views[got].buf;
        iov[got].iov_len = (size_t)views[got].len;
    }
    if (rc == 0)
        fuse_reply_iov(req, iov, (int)n);  /* copies into the kernel before it returns */
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    if (views != stack_views) {
        PyMem_Free(views);
        PyMem_Free(iov);
    }
    return rc;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    PyGILState_STATE gs = PyGILState_Ensure();
    PyObject *handler = h_read;
    if (handler == NULL) {
        PyGILState_Release(gs);
        if (orig_read != NULL)
            orig_read(req, ino, size, off, fi);
        else
            fuse_reply_err(req, ENOSYS);
        return;
    }
    PyObject *s_type, *s_val, *s_tb;                /* normally all NULL */
    PyErr_Fetch(&s_type, &s_val, &s_tb);
    n_read++;
    Py_INCREF(handler);
    PyObject *res = PyObject_CallFunction(handler, "KLK",
                                          (unsigned long long)(fi ? fi->fh : 0),
                                          (long long)off, (unsigned long long)size);
    Py_DECREF(handler);
    if (res == NULL || reply_read(req, res) < 0)
        reply_bad(req, "read", res);
    Py_XDECREF(res);
    PyErr_Restore(s_type, s_val, s_tb);
    PyGILState_Release(gs);
}

/* Pass the request on: pyfuse3's handler `orig` serves it (there is no
 * handler, or it returned None), and the chain ends. */
#define PASS_ON(orig, ...)                        \
    do {                                          \
        g_passed = 1;                             \
        if ((orig) != NULL)                       \
            (orig)(__VA_ARGS__);                  \
        else                                      \
            fuse_reply_err(req, ENOSYS);          \
    } while (0)

/* A write: h_write gets the request's data, a WriteData for a big write (see
 * above) and otherwise a `bytes` copy, as pyfuse3 makes.  It answers with the
 * count written, -errno, or None to pass the request to pyfuse3's own handler
 * (a write that has to wait).  pyfuse3's handler copies the data
 * of a write passed on before it returns. */
static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    PyGILState_STATE gs = PyGILState_Ensure();
    PyObject *handler = h_write;
    if (handler == NULL || size > (size_t)PY_SSIZE_T_MAX) {
        PASS_ON(orig_write, req, ino, buf, size, off, fi);
        PyGILState_Release(gs);
        return;
    }
    PyObject *s_type, *s_val, *s_tb;                /* normally all NULL */
    PyErr_Fetch(&s_type, &s_val, &s_tb);
    n_write++;
    PyObject *res = NULL;
    PyObject *data = WriteData_new(buf, size);
    if (data == NULL)
        data = PyBytes_FromStringAndSize(buf, (Py_ssize_t)size);
    if (data != NULL) {
        Py_INCREF(handler);
        res = PyObject_CallFunction(handler, "KLO", (unsigned long long)(fi ? fi->fh : 0),
                                    (long long)off, data);
        Py_DECREF(handler);
        if (Py_IS_TYPE(data, &WriteData_Type) && Py_REFCNT(data) > 1)
            WriteData_keep((WriteDataObject *)data);
    }
    if (res == Py_None) {
        n_write_passed++;
        PASS_ON(orig_write, req, ino, buf, size, off, fi);   /* buf stays valid: data holds it if kept */
    } else {
        long long v = (res != NULL && PyLong_Check(res)) ? PyLong_AsLongLong(res) : 0;
        if (res == NULL || !PyLong_Check(res) || PyErr_Occurred() || v > (long long)size || v < -4095)
            reply_bad(req, "write", res);
        else if (v < 0)
            fuse_reply_err(req, (int)-v);
        else
            fuse_reply_write(req, (size_t)v);
    }
    Py_XDECREF(res);
    Py_XDECREF(data);
    PyErr_Restore(s_type, s_val, s_tb);
    PyGILState_Release(gs);
}

/* ---- lookup, getattr, unlink, forget ------------------------------------ */

/* Once set_meta_handlers() registers them, these four are answered the same
 * way as reads and writes: the handler is called synchronously and its result
 * replied at once (no coroutine, and a chain goes on through them).  lookup
 * and getattr return the attributes as a tuple (ino, mode, nlink, uid, gid,
 * rdev, size, blksize, blocks in 512-byte units, atime_ns, mtime_ns,
 * ctime_ns), replied with the timeouts given to set_meta_handlers; unlink
 * returns 0; an int errno (> 0) is replied as that error, and None passes the
 * request on to pyfuse3's own handler.  forget has no reply; its handler gets
 * a list of (ino, nlookup). */

static void set_time(struct timespec *ts, long long ns)
{
    long long sec = ns / 1000000000LL, rem = ns % 1000000000LL;
    if (rem < 0) {
        rem += 1000000000LL;
        sec -= 1;
    }
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = (long)rem;
}

static int fill_stat(PyObject *t, struct stat *st)
{
    unsigned long long ino, nlink, rdev;
    unsigned int mode, uid, gid;
    long long size, blksize, blocks, at, mt, ct;
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 12)
        return -1;
    if (!PyArg_ParseTuple(t, "KIKIIKLLLLLL", &ino, &mode, &nlink, &uid, &gid, &rdev, &size,
                          &blksize, &blocks, &at, &mt, &ct))
        return -1;
    memset(st, 0, sizeof(*st));
    st->st_ino = (ino_t)ino;
    st->st_mode = (mode_t)mode;
    st->st_nlink = (nlink_t)nlink;
    st->st_uid = (uid_t)uid;
    st->st_gid = (gid_t)gid;
    st->st_rdev = (dev_t)rdev;
    st->st_size = (off_t)size;
    st->st_blksize = (blksize_t)blksize;
    st->st_blocks = (blkcnt_t)blocks;
    set_time(&st->st_atim, at);
    set_time(&st->st_mtim, mt);
    set_time(&st->st_ctim, ct);
    return 0;
}

/* An errno the handler returned (1..4095; 0 too when zero_ok), or -1. */
static int result_errno(PyObject *res, int zero_ok)
{
    if (res == NULL || !PyLong_Check(res))
        return -1;
    long e = PyLong_AsLong(res);
    if (e == -1 && PyErr_Occurred())
        return -1;
    return (e > 0 || (zero_ok && e == 0)) && e < 4096 ? (int)e : -1;
}

/* An entry (lookup, create, readdirplus) from an attribute tuple, with the
 * timeouts of set_meta_handlers; -1 if the tuple is malformed. */
static int fill_entry(PyObject *t, struct fuse_entry_param *ep)
{
    memset(ep, 0, sizeof(*ep));
    if (fill_stat(t, &ep->attr) < 0)
        return -1;
    ep->ino = ep->attr.st_ino;
    ep->attr_timeout = g_attr_timeout;
    ep->entry_timeout = g_entry_timeout;
    return 0;
}

/* lookup (entry != 0) or getattr: reply res, a tuple or an errno. */
static void reply_attributes(fuse_req_t req, PyObject *res, int entry)
{
    int e = result_errno(res, 0);
    struct fuse_entry_param ep;
    if (e > 0) {
        fuse_reply_err(req, e);
    } else if (res != NULL && fill_entry(res, &ep) == 0) {
        if (entry)
            fuse_reply_entry(req, &ep);
        else
            fuse_reply_attr(req, &ep.attr, g_attr_timeout);
    } else {
        reply_bad(req, entry ? "lookup" : "getattr", res);
    }
}

/* Call handler(*args built from fmt) with the GIL held and any pending
 * exception set aside; *gs and *saved are restored by meta_end(). */
typedef struct {
    PyGILState_STATE gs;
    PyObject *type, *value, *tb;
} meta_call;

static void meta_begin(meta_call *c)
{
    c->gs = PyGILState_Ensure();
    PyErr_Fetch(&c->type, &c->value, &c->tb);
}

static void meta_end(meta_call *c, PyObject *res)
{
    Py_XDECREF(res);
    PyErr_Restore(c->type, c->value, c->tb);
    PyGILState_Release(c->gs);
}

/* handler(*args built from fmt); None (a new reference) when there is no
 * handler, which the caller passes on to pyfuse3 as it does a None result. */
static PyObject *meta_call_handler(PyObject *handler, const char *fmt, ...)
{
    if (handler == NULL)
        return Py_NewRef(Py_None);
    va_list va;
    va_start(va, fmt);
    n_meta++;
    Py_INCREF(handler);
    PyObject *res = Py_VaBuildValue(fmt, va);
    va_end(va);
    if (res != NULL) {
        PyObject *args = res;
        res = PyObject_CallObject(handler, args);
        Py_DECREF(args);
    }
    Py_DECREF(handler);
    if (res == Py_None)
        n_meta_passed++;
    return res;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    meta_call c;
    meta_begin(&c);
    PyObject *res = meta_call_handler(h_lookup, "(Ky#)", (unsigned long long)parent, name,
                                      (Py_ssize_t)strlen(name));
    if (res == Py_None)
        PASS_ON(orig_lookup, req, parent, name);
    else
        reply_attributes(req, res, 1);
    meta_end(&c, res);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    meta_call c;
    meta_begin(&c);
    PyObject *res = meta_call_handler(h_getattr, "(K)", (unsigned long long)ino);
    if (res == Py_None)
        PASS_ON(orig_getattr, req, ino, fi);
    else
        reply_attributes(req, res, 0);
    meta_end(&c, res);
}

/* Reply a handler's 0-or-errno result (unlink, release); 1 if it was None,
 * which the caller passes on to pyfuse3. */
static int reply_status(fuse_req_t req, PyObject *res, const char *op)
{
    if (res == Py_None)
        return 1;
    int e = result_errno(res, 1);
    if (e >= 0)
        fuse_reply_err(req, e);
    else
        reply_bad(req, op, res);
    return 0;
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    meta_call c;
    meta_begin(&c);
    PyObject *res = meta_call_handler(h_unlink, "(Ky#)", (unsigned long long)parent, name,
                                      (Py_ssize_t)strlen(name));
    if (reply_status(req, res, "unlink"))
        PASS_ON(orig_unlink, req, parent, name);
    meta_end(&c, res);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    meta_call c;
    meta_begin(&c);
    PyObject *res = NULL;
    if (h_forget == NULL) {
        if (orig_forget_multi != NULL)
            orig_forget_multi(req, count, forgets);
        else
            fuse_reply_none(req);
    } else {
        PyObject *list = PyList_New((Py_ssize_t)count);
        for (size_t i = 0; list != NULL && i < count; i++) {
            PyObject *item = Py_BuildValue("(KK)", (unsigned long long)forgets[i].ino,
                                           (unsigned long long)forgets[i].nlookup);
            if (item == NULL)
                Py_CLEAR(list);
            else
                PyList_SET_ITEM(list, (Py_ssize_t)i, item);
        }
        if (list != NULL) {
            res = meta_call_handler(h_forget, "(O)", list);
            Py_DECREF(list);
        }
        if (res == NULL)        /* forget has no reply to pass on: what the handler raised is kept */
            keep_exception();
        fuse_reply_none(req);
    }
    meta_end(&c, res);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    if (h_forget == NULL && orig_forget != NULL) {
        orig_forget(req, ino, nlookup);
        return;
    }
    struct fuse_forget_data one = {.ino = ino, .nlookup = nlookup};
    op_forget_multi(req, 1, &one);
}

/* ---- open, create, flush, release -------------------------------------- */

/* Once set_file_handlers() registers them, opening and closing a file are
 * answered inline too.  open and create return the new file handle (>= 0),
 * replied with the direct_io and keep_cache given to set_file_handlers (create
 * with the new file's attributes, as lookup's), or -errno; release returns 0
 * or an errno, like unlink; None passes the request on to pyfuse3.  With
 * no_flush, FLUSH is answered ENOSYS, which the kernel takes to mean that
 * close() has nothing to wait for: it sends no FLUSH again on this mount. */

/* The fh (>= 0) or -errno a handler returned, in *v: 0, or -1 if res is
 * neither (the caller replies EIO). */
static int result_fh(PyObject *res, long long *v)
{
    if (res == NULL || !PyLong_Check(res))
        return -1;
    *v = PyLong_AsLongLong(res);
    if (PyErr_Occurred() || *v < -4095)
        return -1;
    return 0;
}

static void set_file_info(struct fuse_file_info *fi, long long fh)
{
    fi->fh = (uint64_t)fh;
    fi->direct_io = g_direct_io;
    fi->keep_cache = g_keep_cache;
    fi->nonseekable = 0;
}

/* Reply an open's or opendir's result, an fh or -errno (a file's reply also
 * carries direct_io and keep_cache); 1 if it was None, which the caller
 * passes on to pyfuse3. */
static int reply_opened(fuse_req_t req, PyObject *res, struct fuse_file_info *fi, int file)
{
    long long v;
    if (res == Py_None)
        return 1;
    if (result_fh(res, &v) < 0) {
        reply_bad(req, file ? "open" : "opendir", res);
    } else if (v < 0) {
        fuse_reply_err(req, (int)-v);
    } else {
        if (file)
            set_file_info(fi, v);
        else
            fi->fh = (uint64_t)v;
        fuse_reply_open(req, fi);
    }
    return 0;
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    meta_call c;
    meta_begin(&c);
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    PyObject *res = meta_call_handler(h_open, "(KiK)", (unsigned long long)ino, fi->flags,
                                      (unsigned long long)ctx->pid);
    if (reply_opened(req, res, fi, 1))
        PASS_ON(orig_open, req, ino, fi);
    meta_end(&c, res);
}

/* Reply a create's or tmpfile's result: (fh, attributes) or -errno. */
static void reply_created(fuse_req_t req, PyObject *res, struct fuse_file_info *fi, const char *op)
{
    struct fuse_entry_param ep;
    long long v;
    if (result_fh(res, &v) == 0 && v < 0) {
        fuse_reply_err(req, (int)-v);
    } else if (!PyErr_Occurred() && res != NULL && PyTuple_Check(res) && PyTuple_GET_SIZE(res) == 2
               && result_fh(PyTuple_GET_ITEM(res, 0), &v) == 0 && v >= 0
               && fill_entry(PyTuple_GET_ITEM(res, 1), &ep) == 0) {
        set_file_info(fi, v);
        fuse_reply_create(req, &ep, fi);
    } else {
        reply_bad(req, op, res);
    }
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi)
{
    meta_call c;
    meta_begin(&c);
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    PyObject *res = meta_call_handler(h_create, "(Ky#IiIIIK)", (unsigned long long)parent, name,
                                      (Py_ssize_t)strlen(name), (unsigned int)mode, fi->flags,
                                      (unsigned int)ctx->uid, (unsigned int)ctx->gid,
                                      (unsigned int)ctx->umask, (unsigned long long)ctx->pid);
    if (res == Py_None)
        PASS_ON(orig_create, req, parent, name, mode, fi);
    else
        reply_created(req, res, fi, "create");
    meta_end(&c, res);
}

/* O_TMPFILE (FUSE_TMPFILE, which pyfuse3 does not register): like create,
 * without a name.  Without a handler the request gets ENOSYS, after which the
 * kernel answers EOPNOTSUPP to every O_TMPFILE open on this mount. */
static void op_tmpfile(fuse_req_t req, fuse_ino_t parent, mode_t mode, struct fuse_file_info *fi)
{
    meta_call c;
    meta_begin(&c);
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    PyObject *res = meta_call_handler(h_tmpfile, "(KIiIIIK)", (unsigned long long)parent,
                                      (unsigned int)mode, fi->flags, (unsigned int)ctx->uid,
                                      (unsigned int)ctx->gid, (unsigned int)ctx->umask,
                                      (unsigned long long)ctx->pid);
    if (res == Py_None)
        PASS_ON(orig_tmpfile, req, parent, mode, fi);
    else
        reply_created(req, res, fi, "tmpfile");
    meta_end(&c, res);
}

/* release or releasedir: handler(fh) -> 0 | errno | None. */
static void release_with(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
                         PyObject *handler, file_fn orig, const char *op)
{
    meta_call c;
    meta_begin(&c);
    PyObject *res = meta_call_handler(handler, "(K)", (unsigned long long)fi->fh);
    if (reply_status(req, res, op))
        PASS_ON(orig, req, ino, fi);
    meta_end(&c, res);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    release_with(req, ino, fi, h_release, orig_release, "release");
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (g_no_flush) {
        n_meta++;
        fuse_reply_err(req, ENOSYS);
    } else {
        PASS_ON(orig_flush, req, ino, fi);
    }
}

/* lseek: only SEEK_DATA and SEEK_HOLE reach a daemon (the kernel does the
 * others itself); anything else is answered EINVAL.  Once set_lseek_handler()
 * registers it, lseek(fh, off, whence) returns the new offset (>= 0) or
 * -errno; None passes the request on to pyfuse3, which has no lseek: ENOSYS,
 * after which the kernel answers SEEK_DATA/SEEK_HOLE on this mount itself
 * (the whole file is data) and asks no more. */
static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    meta_call c;
    meta_begin(&c);
    PyObject *res = meta_call_handler(h_lseek, "(KLi)", (unsigned long long)(fi ? fi->fh : 0),
                                      (long long)off, whence);
    long long v;
    if (res == Py_None)
        PASS_ON(orig_lseek, req, ino, off, whence, fi);
    else if (result_fh(res, &v) < 0)
        reply_bad(req, "lseek", res);
    else if (v < 0)
        fuse_reply_err(req, (int)-v);
    else
        fuse_reply_lseek(req, (off_t)v);
    meta_end(&c, res);
}

/* ---- opendir, readdirplus, releasedir ------------------------------------ */

/* Once set_dir_handlers() registers them, listing a directory is answered
 * inline too.  opendir and releasedir answer as open and release do (without
 * the file flags).  readdir(fh, off, size) returns the entries from `off` on,
 * as many as may fit in `size` bytes: tuples (name, attributes, next_off),
 * attributes as lookup returns them; C packs as many as fit, and then calls
 * looked_up(ino) for each entry packed but "." and "..", since the kernel
 * counts the others as lookups (it sends FORGET for them later). */

static int is_dot(const char *name)
{
    return name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'));
}

/* Pack the entries of `list` that fit in size bytes and reply them; -1 (and
 * nothing counted or replied) if an entry is malformed. */
static int reply_dir(fuse_req_t req, PyObject *list, size_t size)
{
    Py_ssize_t n = PyList_GET_SIZE(list), packed = 0;
    char *buf = PyMem_Malloc(size ? size : 1);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t used = 0;
    for (; packed < n; packed++) {
        PyObject *t = PyList_GET_ITEM(list, packed), *attrs;
        const char *name;
        long long next;
        struct fuse_entry_param ep;
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(t, 0))
            || !PyArg_ParseTuple(t, "yOL", &name, &attrs, &next)
            || fill_entry(attrs, &ep) < 0) {
            PyMem_Free(buf);
            return -1;
        }
        size_t need = fuse_add_direntry_plus(req, NULL, 0, name, &ep, (off_t)next);
        if (used + need > size)
            break;
        fuse_add_direntry_plus(req, buf + used, size - used, name, &ep, (off_t)next);
        used += need;
    }
    for (Py_ssize_t i = 0; h_looked_up != NULL && i < packed; i++) {
        PyObject *t = PyList_GET_ITEM(list, i);
        if (is_dot(PyBytes_AS_STRING(PyTuple_GET_ITEM(t, 0))))
            continue;
        PyObject *ino = PyTuple_GET_ITEM(PyTuple_GET_ITEM(t, 1), 0);
        PyObject *r = PyObject_CallOneArg(h_looked_up, ino);
        if (r == NULL)
            keep_exception();       /* the entry is replied all the same */
        Py_XDECREF(r);
    }
    fuse_reply_buf(req, buf, used);
    PyMem_Free(buf);
    return 0;
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    meta_call c;
    meta_begin(&c);
    PyObject *res = meta_call_handler(h_opendir, "(K)", (unsigned long long)ino);
    if (reply_opened(req, res, fi, 0))
        PASS_ON(orig_opendir, req, ino, fi);
    meta_end(&c, res);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                           struct fuse_file_info *fi)
{
    meta_call c;
    meta_begin(&c);
    PyObject *res = meta_call_handler(h_readdir, "(KLK)", (unsigned long long)fi->fh,
                                      (long long)off, (unsigned long long)size);
    int e;
    if (res == Py_None)
        PASS_ON(orig_readdirplus, req, ino, size, off, fi);
    else if (res != NULL && PyList_Check(res)) {
        if (reply_dir(req, res, size) < 0)
            reply_bad(req, "readdir", res);
    } else if ((e = result_errno(res, 0)) > 0)
        fuse_reply_err(req, e);
    else
        reply_bad(req, "readdir", res);
    meta_end(&c, res);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    release_with(req, ino, fi, h_releasedir, orig_releasedir, "releasedir");
}

/* ---- init --------------------------------------------------------------- */

/* pyfuse3's init asks for what pyfuse3 knows; then:
 * - FUSE_CAP_DONT_MASK if set_dont_mask() asked for it: the kernel then
 *   passes create, mkdir, mknod and tmpfile modes unmasked, with the umask
 *   beside them, and the filesystem applies the umask or the directory's
 *   default ACL itself (without it the kernel applies the umask even where a
 *   default ACL should replace it);
 * - shared mappings of direct_io files (FUSE_CAP_DIRECT_IO_ALLOW_MMAP, kernel
 *   >= 6.6): without it the kernel refuses MAP_SHARED of every file opened
 *   with direct_io (ENODEV).  With it, the kernel keeps a mapped inode's page
 *   cache coherent with direct reads and writes itself: a direct read or
 *   write first writes back the dirty pages of its range, and a direct write
 *   drops the cached pages it covers. */
static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    if (orig_init != NULL)
        orig_init(userdata, conn);
    if (g_dont_mask && (conn->capable & FUSE_CAP_DONT_MASK))
        conn->want |= FUSE_CAP_DONT_MASK;
    if (conn->capable & FUSE_CAP_DIRECT_IO_ALLOW_MMAP)
        conn->want |= FUSE_CAP_DIRECT_IO_ALLOW_MMAP;
    g_allow_mmap = (conn->want & FUSE_CAP_DIRECT_IO_ALLOW_MMAP) != 0;
    g_proto_major = conn->proto_major;
    g_proto_minor = conn->proto_minor;
    g_init_done = 1;
}

/* ---- the interposed libfuse entry points ------------------------------- */

/* libfuse 3.17's fuse_session_new() is an inline wrapper around this one,
 * so this is the symbol a pyfuse3 compiled against it binds. */
EXPORT struct fuse_session *
fuse_session_new_versioned(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                           size_t op_size, struct libfuse_version *version, void *userdata)
{
    session_new_fn real = (session_new_fn)dlvsym(RTLD_NEXT, "fuse_session_new_versioned", "FUSE_3.17");
    if (real == NULL) {
        errno = ENOSYS;
        return NULL;
    }
    if (op == NULL)
        return real(args, op, op_size, version, userdata);

    /* libfuse copies the table into the session, so a stack copy is fine. */
    struct fuse_lowlevel_ops ops;
    memset(&ops, 0, sizeof(ops));
    memcpy(&ops, op, op_size < sizeof(ops) ? op_size : sizeof(ops));
    ops.copy_file_range = op_copy_file_range;
    ops.fallocate = op_fallocate;
    /* Route a request to op_<name>, keeping pyfuse3's handler as orig_<name>. */
#define ROUTE(name) (orig_##name = ops.name, ops.name = op_##name)
    ROUTE(init);
    ROUTE(read);
    ROUTE(write);
    /* libfuse prefers write_buf (pyfuse3 sets it, and it makes libfuse splice
     * big writes into a pipe); without it every write comes to op_write, in
     * memory.  pyfuse3's plain write handler serves whatever op_write passes on. */
    ops.write_buf = NULL;
    ROUTE(lookup);
    ROUTE(getattr);
    ROUTE(unlink);
    ROUTE(forget);
    ROUTE(forget_multi);
    ROUTE(open);
    ROUTE(create);
    ROUTE(tmpfile);
    ROUTE(flush);
    ROUTE(release);
    ROUTE(lseek);
    ROUTE(opendir);
    ROUTE(readdirplus);
    ROUTE(releasedir);
#undef ROUTE
    g_interposed = 1;
    return real(args, &ops, sizeof(ops), version, userdata);
}

EXPORT void fuse_session_destroy(struct fuse_session *se)
{
    session_destroy_fn real = (session_destroy_fn)dlvsym(RTLD_NEXT, "fuse_session_destroy", "FUSE_3.0");
    if (real == NULL)
        real = (session_destroy_fn)dlsym(RTLD_NEXT, "fuse_session_destroy");
    /* Outstanding Request objects must not reply into a freed session.
     * (Callers hold the GIL here in pyfuse3; a plain increment suffices.) */
    __atomic_add_fetch(&g_session_gen, 1, __ATOMIC_SEQ_CST);
    if (real != NULL)
        real(se);
}

/* Relabel (see the top of this file), then hand the request to libfuse. */
static void process_one(process_buf_fn real, struct fuse_session *se, const struct fuse_buf *buf)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    /* Only requests read into memory can be relabelled (libfuse reads into a
     * pipe only for a write_buf handler, which fuse_session_new removes). */
    if (g_interposed && !(buf->flags & FUSE_BUF_IS_FD) && buf->mem != NULL
        && buf->size >= sizeof(struct wire_in_header)) {
        struct wire_in_header *in = (struct wire_in_header *)buf->mem;
        if (in->opcode == WIRE_COPY_FILE_RANGE_64) {
            in->opcode = WIRE_COPY_FILE_RANGE;
            __atomic_add_fetch(&n_copy_file_range_64, 1, __ATOMIC_RELAXED);
        }
    }
#endif
    g_cur = (struct fuse_buf *)buf;         /* for WriteData (op_write) */
    real(se, buf);
    g_cur = NULL;
}

/* A request a registered handler will answer before libfuse returns (it
 * leaves no coroutine for pyfuse3's loop to await), unless the handler passes
 * it on (g_passed). */
static int served_inline(const struct fuse_buf *buf)
{
    if ((buf->flags & FUSE_BUF_IS_FD) || buf->mem == NULL || buf->size < sizeof(struct wire_in_header))
        return 0;
    switch (((struct wire_in_header *)buf->mem)->opcode) {
    case WIRE_READ: return h_read != NULL;
    case WIRE_WRITE: return h_write != NULL;
    case WIRE_LOOKUP: return h_lookup != NULL;
    case WIRE_GETATTR: return h_getattr != NULL;
    case WIRE_UNLINK: return h_unlink != NULL;
    case WIRE_FORGET:
    case WIRE_BATCH_FORGET: return h_forget != NULL;
    case WIRE_OPEN: return h_open != NULL;
    case WIRE_CREATE: return h_create != NULL;
    case WIRE_RELEASE: return h_release != NULL;
    case WIRE_FLUSH: return g_no_flush;
    case WIRE_OPENDIR: return h_opendir != NULL;
    case WIRE_READDIRPLUS: return h_readdir != NULL;
    case WIRE_RELEASEDIR: return h_releasedir != NULL;
    default: return 0;
    }
}

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Wait up to chain_wait_ns for the next request; 1 if one is there. */
static int next_request_ready(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    struct timespec ts = {.tv_sec = 0, .tv_nsec = chain_wait_ns};
    int r;
    if (PyGILState_Check()) {
        Py_BEGIN_ALLOW_THREADS
        r = ppoll(&p, 1, &ts, NULL);
        Py_END_ALLOW_THREADS
    } else {
        r = ppoll(&p, 1, &ts, NULL);
    }
    return r == 1 && (p.revents & (POLLIN | POLLERR | POLLHUP)) == POLLIN;
}

EXPORT void fuse_session_process_buf(struct fuse_session *se, const struct fuse_buf *buf)
{
    static process_buf_fn real = NULL;
    if (real == NULL) {
        real = (process_buf_fn)dlvsym(RTLD_NEXT, "fuse_session_process_buf", "FUSE_3.0");
        if (real == NULL)
            real = (process_buf_fn)dlsym(RTLD_NEXT, "fuse_session_process_buf");
        if (real == NULL)
            return;   /* cannot happen with libfuse3 loaded; nothing sane to do */
    }
    int chain = chain_wait_ns > 0 && served_inline(buf);
    g_passed = 0;
    process_one(real, se, buf);
    chain = chain && !g_passed;             /* pyfuse3's coroutine waits for the loop: give it back */
    /* Chain (see the top of this file).  The buffer is the caller's own
     * receive buffer (pyfuse3 passes its loop's fuse_buf): it is free again,
     * since the request has been answered and nothing else refers to it. */
    struct fuse_buf *b = (struct fuse_buf *)buf;
    long long deadline = chain ? now_ns() + CHAIN_MAX_NS : 0;
    for (int i = 0; chain && i < CHAIN_MAX && !fuse_session_exited(se); i++) {
        if (now_ns() >= deadline || !next_request_ready(fuse_session_fd(se)))
            break;
        if (fuse_session_receive_buf(se, b) <= 0)
            break;                          /* EINTR, ENOENT, or exit: the loop sees it next */
        n_chained++;
        chain = served_inline(b);
        g_passed = 0;
        process_one(real, se, b);
        chain = chain && !g_passed;
    }
}

/* ---- module functions --------------------------------------------------- */

static int check_callable(PyObject *o, const char *name)
{
    if (o != Py_None && !PyCallable_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be callable or None", name);
        return -1;
    }
    return 0;
}

/* Put a checked callable (NULL for None) in a handler slot. */
static void put_slot(PyObject **slot, PyObject *arg)
{
    PyObject *new_handler = arg == Py_None ? NULL : Py_NewRef(arg);
    Py_XSETREF(*slot, new_handler);
}

static PyObject *m_set_handlers(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"copy_file_range", "fallocate", NULL};
    PyObject *cfr = Py_None, *fa = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OO:set_handlers", kwlist, &cfr, &fa))
        return NULL;
    if (check_callable(cfr, "copy_file_range") < 0 || check_callable(fa, "fallocate") < 0)
        return NULL;
    put_slot(&h_copy_file_range, cfr);
    put_slot(&h_fallocate, fa);
    Py_RETURN_NONE;
}

/* Check a callable, then put_slot() it. */
static PyObject *set_slot(PyObject **slot, PyObject *arg, const char *name)
{
    if (check_callable(arg, name) < 0)
        return NULL;
    put_slot(slot, arg);
    Py_RETURN_NONE;
}

static PyObject *m_set_read_handler(PyObject *mod, PyObject *arg)
{
    return set_slot(&h_read, arg, "read");
}

static PyObject *m_set_write_handler(PyObject *mod, PyObject *arg)
{
    return set_slot(&h_write, arg, "write");
}

static PyObject *m_set_lseek_handler(PyObject *mod, PyObject *arg)
{
    return set_slot(&h_lseek, arg, "lseek");
}

static PyObject *m_set_meta_handlers(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"lookup", "getattr", "unlink", "forget", "entry_timeout",
                             "attr_timeout", NULL};
    PyObject *lk = Py_None, *ga = Py_None, *ul = Py_None, *fg = Py_None;
    double et = 1.0, at = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OOOOdd:set_meta_handlers", kwlist,
                                     &lk, &ga, &ul, &fg, &et, &at))
        return NULL;
    if (check_callable(lk, "lookup") < 0 || check_callable(ga, "getattr") < 0
        || check_callable(ul, "unlink") < 0 || check_callable(fg, "forget") < 0)
        return NULL;
    if (!(et >= 0) || !(at >= 0)) {
        PyErr_SetString(PyExc_ValueError, "timeouts must be >= 0");
        return NULL;
    }
    put_slot(&h_lookup, lk);
    put_slot(&h_getattr, ga);
    put_slot(&h_unlink, ul);
    put_slot(&h_forget, fg);
    g_entry_timeout = et;
    g_attr_timeout = at;
    Py_RETURN_NONE;
}

static PyObject *m_set_file_handlers(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"open", "create", "release", "direct_io", "keep_cache", "no_flush",
                             "tmpfile", NULL};
    PyObject *op = Py_None, *cr = Py_None, *rl = Py_None, *tf = Py_None;
    int dio = 0, kc = 0, nf = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OOOpppO:set_file_handlers", kwlist,
                                     &op, &cr, &rl, &dio, &kc, &nf, &tf))
        return NULL;
    if (check_callable(op, "open") < 0 || check_callable(cr, "create") < 0
        || check_callable(rl, "release") < 0 || check_callable(tf, "tmpfile") < 0)
        return NULL;
    put_slot(&h_open, op);
    put_slot(&h_create, cr);
    put_slot(&h_tmpfile, tf);
    put_slot(&h_release, rl);
    g_direct_io = dio;
    g_keep_cache = kc;
    g_no_flush = nf;
    Py_RETURN_NONE;
}

static PyObject *m_set_dont_mask(PyObject *mod, PyObject *arg)
{
    int v = PyObject_IsTrue(arg);
    if (v < 0)
        return NULL;
    g_dont_mask = v;
    Py_RETURN_NONE;
}

static PyObject *m_set_dir_handlers(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"opendir", "readdir", "releasedir", "looked_up", NULL};
    PyObject *od = Py_None, *rd = Py_None, *rl = Py_None, *lu = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OOOO:set_dir_handlers", kwlist, &od, &rd, &rl, &lu))
        return NULL;
    if (check_callable(od, "opendir") < 0 || check_callable(rd, "readdir") < 0
        || check_callable(rl, "releasedir") < 0 || check_callable(lu, "looked_up") < 0)
        return NULL;
    if (rd != Py_None && lu == Py_None) {
        PyErr_SetString(PyExc_ValueError, "a readdir handler needs looked_up");
        return NULL;
    }
    put_slot(&h_opendir, od);
    put_slot(&h_readdir, rd);
    put_slot(&h_releasedir, rl);
    put_slot(&h_looked_up, lu);
    Py_RETURN_NONE;
}

static PyObject *m_set_chain_wait(PyObject *mod, PyObject *arg)
{
    long us = PyLong_AsLong(arg);
    if (us == -1 && PyErr_Occurred())
        return NULL;
    if (us < 0 || us >= 1000000) {
        PyErr_SetString(PyExc_ValueError, "the chain wait must be 0 to 999999 microseconds");
        return NULL;
    }
    chain_wait_ns = us * 1000;
    Py_RETURN_NONE;
}

static PyObject *m_interposed(PyObject *mod, PyObject *unused)
{
    return PyBool_FromLong(g_interposed);
}

static PyObject *m_negotiated(PyObject *mod, PyObject *unused)
{
    if (!g_init_done)
        Py_RETURN_NONE;
    return Py_BuildValue("{s:s,s:(II),s:O}", "libfuse", fuse_pkgversion(),
                         "protocol", g_proto_major, g_proto_minor,
                         "direct_io_allow_mmap", g_allow_mmap ? Py_True : Py_False);
}

static PyObject *m_counts(PyObject *mod, PyObject *unused)
{
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}",
                         "copy_file_range", n_copy_file_range,
                         "copy_file_range_64", n_copy_file_range_64,
                         "fallocate", n_fallocate,
                         "read", n_read,
                         "write", n_write,
                         "write_passed", n_write_passed,
                         "write_kept", n_write_kept,
                         "meta", n_meta,
                         "meta_passed", n_meta_passed,
                         "default_replies", n_default_replies,
                         "dropped", n_dropped,
                         "chained", n_chained);
}

static PyObject *m_last_exception(PyObject *mod, PyObject *unused)
{
    if (last_exc == NULL)
        Py_RETURN_NONE;
    return Py_NewRef(last_exc);
}

static PyMethodDef module_methods[] = {
    {"set_handlers", (PyCFunction)(void (*)(void))m_set_handlers, METH_VARARGS | METH_KEYWORDS,
     "set_handlers(copy_file_range=None, fallocate=None)\n\n"
     "copy_file_range(req, ino_in, fh_in, off_in, ino_out, fh_out, off_out, length, flags)\n"
     "fallocate(req, ino, fh, mode, offset, length)\n"
     "The callable must eventually call req.reply_write()/req.reply_err()."},
    {"set_read_handler", m_set_read_handler, METH_O,
     "set_read_handler(read)\n\n"
     "read(fh, off, size) -> list of buffers | one buffer | errno (int > 0), called\n"
     "synchronously for every read; None gives reads back to pyfuse3's handler.\n"
     "An exception replies EIO (see last_exception())."},
    {"set_write_handler", m_set_write_handler, METH_O,
     "set_write_handler(write)\n\n"
     "write(fh, off, data) -> count | -errno | None, called synchronously for\n"
     "every write; data is bytes, or a WriteData (read-only buffer, no copy) for a\n"
     "big write; None passes the request to pyfuse3's handler; None as write gives\n"
     "writes back to pyfuse3.  An exception replies EIO (see last_exception())."},
    {"set_lseek_handler", m_set_lseek_handler, METH_O,
     "set_lseek_handler(lseek)\n\n"
     "lseek(fh, off, whence) -> offset | -errno | None, called synchronously for\n"
     "SEEK_DATA and SEEK_HOLE (any other whence is answered EINVAL); None passes the\n"
     "request to pyfuse3, which answers ENOSYS.  An exception replies EIO."},
    {"set_meta_handlers", (PyCFunction)(void (*)(void))m_set_meta_handlers, METH_VARARGS | METH_KEYWORDS,
     "set_meta_handlers(lookup=None, getattr=None, unlink=None, forget=None,\n"
     "                  entry_timeout=1.0, attr_timeout=1.0)\n\n"
     "lookup(parent, name) / getattr(ino) -> (ino, mode, nlink, uid, gid, rdev, size,\n"
     "blksize, blocks, atime_ns, mtime_ns, ctime_ns) | errno | None;\n"
     "unlink(parent, name) -> 0 | errno | None; forget([(ino, nlookup), ...]).\n"
     "Called synchronously; None passes the request to pyfuse3's handler; a handler\n"
     "set to None gives its requests back to pyfuse3.  An exception replies EIO."},
    {"set_file_handlers", (PyCFunction)(void (*)(void))m_set_file_handlers, METH_VARARGS | METH_KEYWORDS,
     "set_file_handlers(open=None, create=None, release=None, direct_io=False,\n"
     "                  keep_cache=False, no_flush=False)\n\n"
     "open(ino, flags, pid) -> fh | -errno | None;\n"
     "create(parent, name, mode, flags, uid, gid, umask, pid) -> (fh, attributes) |\n"
     "-errno | None, attributes as set_meta_handlers' lookup returns them;\n"
     "release(fh) -> 0 | errno | None.  Called synchronously; the file info replied\n"
     "carries direct_io and keep_cache.  None passes the request to pyfuse3's\n"
     "handler.  no_flush=True answers FLUSH with ENOSYS, so the kernel stops\n"
     "sending it (for a filesystem whose flush does nothing).\n"
     "tmpfile(parent, mode, flags, uid, gid, umask, pid) answers O_TMPFILE as create\n"
     "does (without a handler: ENOSYS, and the kernel refuses O_TMPFILE)."},
    {"set_dont_mask", m_set_dont_mask, METH_O,
     "set_dont_mask(flag)\n\n"
     "Ask the kernel at INIT for FUSE_CAP_DONT_MASK: create, mkdir, mknod and tmpfile\n"
     "then get the mode unmasked and the umask beside it.  Call before the INIT\n"
     "request is processed (before pyfuse3.main())."},
    {"set_dir_handlers", (PyCFunction)(void (*)(void))m_set_dir_handlers, METH_VARARGS | METH_KEYWORDS,
     "set_dir_handlers(opendir=None, readdir=None, releasedir=None, looked_up=None)\n\n"
     "opendir(ino) -> fh | -errno | None; releasedir(fh) -> 0 | errno | None;\n"
     "readdir(fh, off, size) -> [(name, attributes, next_off), ...] | errno | None,\n"
     "the entries from off on (as many as may fit in size bytes), attributes as\n"
     "set_meta_handlers' lookup returns them, answering READDIRPLUS: the entries\n"
     "that fit are replied, and looked_up(ino) is called for each but . and ..\n"
     "(the kernel counts them as lookups).  Called synchronously; None passes the\n"
     "request to pyfuse3's handler."},
    {"set_chain_wait", m_set_chain_wait, METH_O,
     "set_chain_wait(wait_us)\n\n"
     "After a read or write answered by its handler, wait up to wait_us microseconds\n"
     "for the next request and serve it at once (0: never; every request then goes\n"
     "back through pyfuse3's loop)."},
    {"interposed", m_interposed, METH_NOARGS,
     "interposed() -> bool: True once pyfuse3's fuse_session_new went through us."},
    {"negotiated", m_negotiated, METH_NOARGS,
     "negotiated() -> dict | None: the libfuse version and what INIT agreed with the kernel\n"
     "(protocol version, direct_io_allow_mmap); None before INIT."},
    {"counts", m_counts, METH_NOARGS,
     "counts() -> dict: requests received per operation (plus fallback stats)."},
    {"last_exception", m_last_exception, METH_NOARGS,
     "last_exception() -> BaseException | None: last exception raised by a handler."},
    {NULL}
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "reflinkfs.fuse._extops",
    .m_doc = "copy_file_range/fallocate support for pyfuse3 via fuse_session_new interposition.",
    .m_size = -1,
    .m_methods = module_methods,
};

EXPORT PyMODINIT_FUNC PyInit__extops(void)
{
    if (PyType_Ready(&Request_Type) < 0 || PyType_Ready(&WriteData_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Request", (PyObject *)&Request_Type) < 0
        || PyModule_AddObjectRef(m, "WriteData", (PyObject *)&WriteData_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
